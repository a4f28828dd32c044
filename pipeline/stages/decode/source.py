"""Where a video's bytes come from: a local path, or an fsspec object (streamed, or copied to a
bounded temporary file for backends that need a path), with storage failures turned into reasons.

Storage failures are told apart from bad files: `not_found`, `permission_denied`, and `read_failed`
for anything else the storage raised (retried by the stage); `StorageFile` remembers an error
FFmpeg would otherwise report as damaged data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, Protocol

import fsspec

from pipeline.errors import ErrorReason
from pipeline.stages.decode.errors import DecodeError


def is_local(uri: str) -> bool:
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol in (None, "file", "local")


class ByteStream(Protocol):
    """A seekable file object as the decoders read it: a binary file, or a `StorageFile`."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...


class StorageFile:
    """A remote file object that remembers the first error its storage raised on a read or seek.

    PyAV re-raises an exception from its I/O callbacks only sometimes; otherwise FFmpeg sees an error
    or an early end of file, and a storage outage would pass for a damaged or truncated video.
    `decode_video` checks `error` after every attempt and reports `read_failed` instead."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: BaseException | None = None

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            if self.error is None:
                self.error = exc
            raise

    def read(self, n: int = -1) -> bytes:
        return self._io(self._f.read, n)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._io(self._f.seek, offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


# a path that cannot be resolved: a symlink loop, a name too long, a file where a folder should be
UNRESOLVABLE_ERRNOS = frozenset({errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR})


def storage_error(uri: str, exc: BaseException) -> DecodeError:
    """A storage failure as an error: missing, refused, or (anything else: connection refused or
    reset, timeouts, 5xx, which botocore raises as non-OSError types) read_failed, retried later."""
    if isinstance(exc, DecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return DecodeError(ErrorReason.NOT_FOUND, f"no such object: {uri}")
    if isinstance(exc, PermissionError):
        return DecodeError(ErrorReason.PERMISSION_DENIED, f"{uri}: {exc}")
    msg = " ".join(str(exc).split())[:300]
    return DecodeError(ErrorReason.READ_FAILED, f"{uri}: {type(exc).__name__}: {msg}")


@contextlib.contextmanager
def open_source(
    uri: str, storage_options: dict | None, max_bytes: int, local_path: bool
) -> Iterator[str | ByteStream]:
    """Yield something a backend can open: an absolute local path, or (remote, `local_path` False)
    a seekable fsspec file object wrapped in `StorageFile`; with `local_path` True a remote file is
    copied to a temporary file first. The size limit and emptiness are checked before anything is
    read. Storage failures become DecodeErrors (`storage_error`)."""
    if is_local(uri):
        path = os.path.abspath(fsspec.core.strip_protocol(uri) if "://" in uri else uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DecodeError(ErrorReason.NOT_FOUND, f"no such file: {path}") from None
        except PermissionError:
            raise DecodeError(ErrorReason.PERMISSION_DENIED, f"cannot stat {path}") from None
        except OSError as exc:
            if exc.errno in UNRESOLVABLE_ERRNOS:  # the same on every try: not a storage failure
                raise DecodeError(ErrorReason.UNRESOLVABLE_PATH, f"{path}: {exc.strerror}") from None
            raise DecodeError(ErrorReason.READ_FAILED, f"{type(exc).__name__}: {exc}") from None
        if not os.path.isfile(path):
            raise DecodeError(ErrorReason.NOT_A_VIDEO, f"not a regular file: {path}")
        _check_size(st.st_size, max_bytes)
        if not os.access(path, os.R_OK):
            raise DecodeError(ErrorReason.PERMISSION_DENIED, f"cannot read {path}")
        yield path  # absolute, so FFmpeg never reads a "name:" prefix as a protocol
        return

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    try:
        size = fs.size(path)
    except Exception as exc:  # noqa: BLE001 - every storage failure becomes a precise reason
        raise storage_error(uri, exc) from None
    if size is None:
        raise DecodeError(ErrorReason.READ_FAILED, f"{uri}: storage reports no size")
    _check_size(size, max_bytes)
    if local_path:
        suffix = pathlib.PurePosixPath(path).suffix
        with tempfile.TemporaryDirectory(prefix="moref-decode-") as tmp:
            local = os.path.join(tmp, "video" + suffix)
            try:
                with fs.open(path, "rb") as src, open(local, "wb") as dst:
                    # bounded: never write more than the size limit, whatever the stream delivers
                    _copy_bounded(src, dst, max_bytes)
            except Exception as exc:  # noqa: BLE001
                raise storage_error(uri, exc) from None
            yield local
    else:
        try:
            f = fs.open(path, "rb", cache_type="readahead", block_size=1 << 20)
        except Exception as exc:  # noqa: BLE001
            raise storage_error(uri, exc) from None
        with f:
            yield StorageFile(f)


def _check_size(size: int, max_bytes: int) -> None:
    if size == 0:
        raise DecodeError(ErrorReason.EMPTY_FILE, "file has 0 bytes")
    if size > max_bytes:
        raise DecodeError(ErrorReason.TOO_LARGE, f"file has {size} bytes, limit is {max_bytes}")


def _copy_bounded(src: BinaryIO, dst: BinaryIO, max_bytes: int) -> None:
    copied = 0
    while chunk := src.read(8 << 20):
        copied += len(chunk)
        if copied > max_bytes:
            raise DecodeError(
                ErrorReason.TOO_LARGE, f"object grew past the limit of {max_bytes} bytes while reading"
            )
        dst.write(chunk)


def file_size(file: str | ByteStream) -> int | None:
    if isinstance(file, str):
        return os.path.getsize(file)
    try:
        return file.size if hasattr(file, "size") else None
    except Exception:  # noqa: BLE001 - size is only used for a truncation check
        return None
