"""Durable file operations: write, fsync, rename, folder fsync.

The one rule of the receive path (docs/durability.md): success is answered only after the bytes
and their row are durable. For a file that means: written to a temporary name, ``fsync``,
renamed into place, its folder ``fsync``ed (the rename is then durable too).

A failed ``fsync`` is fatal for the file it concerns and is never retried on the same file
descriptor: after a write-back error Linux may have dropped the dirty pages and marked them
clean, so a second ``fsync`` can succeed on data that never reached the disk. The callers here
close the descriptor, remove the file and raise; the C-STORE that wrote it fails (0xA700) and the
sender sends it again into a fresh file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path


def fsync_dir(path: Path | str) -> None:
    """fsync a folder (makes the entries created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, root: Path, fsync: bool) -> None:
    """Create ``path`` (below ``root``) and fsync each parent whose entries changed."""
    if path.is_dir():
        return
    ensure_dir(path.parent, root, fsync)
    try:
        path.mkdir()
    except FileExistsError:
        return
    if fsync:
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """``os.write`` until all of ``data`` is written; returns its length."""
    view = memoryview(data)
    total = len(view)
    while view:
        view = view[os.write(fd, view) :]
    return total


def write_durable(
    path: Path,
    chunks: Sequence[bytes | bytearray | memoryview],
    root: Path,
    fsync: bool = True,
) -> int:
    """Write ``chunks`` to ``path`` durably (temporary file, fsync, rename, folder fsync).

    Returns the size. On any error (a failed fsync included) nothing is left at ``path`` or
    under a temporary name, and the error is raised.
    """
    ensure_dir(path.parent, root, fsync)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        size = sum(write_all(fd, chunk) for chunk in chunks)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # its folder entry may not be durable: never half-kept
        raise
    return size


def is_inside(path: Path, root: Path) -> bool:
    """Lexical check (no symlinks are created below the spool): ``path`` stays under ``root``."""
    normal = os.path.normpath(path)
    return os.path.commonpath([normal, os.fspath(root)]) == os.fspath(root)


#: Start the disk write-back of a large instance every this many bytes while it still arrives,
#: so the fsync before the answer only waits for the tail.
WRITEBACK_STEP = 4 << 20


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)`` (Linux): starts write-back
    without waiting for it (Python has no binding). A no-op where it is not available; its
    errors are ignored, as the fsync before the answer reports them."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.sync_file_range
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        func.restype = ctypes.c_int
    except (OSError, AttributeError):
        return lambda _fd, _offset, _count: None

    def start(fd: int, offset: int, count: int) -> None:
        func(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE

    return start


start_writeback = _load_sync_file_range()
