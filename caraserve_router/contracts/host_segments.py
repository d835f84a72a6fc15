"""Named shared-memory segments that the instances of one host share: one host copy of each
adapter, however many instances serve it.

A segment is a file in /dev/shm (tmpfs) named for its content (`AdapterStore` derives the name
from the adapter file's identity and the layout), so instances given the same prefix find each
other's copies. The protocol, on advisory `flock` locks (Linux):

- A name only ever holds complete bytes: a maker fills a private temporary file and then links
  it to the name; if another maker linked first, its copy is used and ours is dropped.
- Every process that maps a segment holds a shared lock on it for as long as it is mapped.
- A process that unmaps tries an exclusive lock without waiting: if it gets it, nobody else
  maps the segment, and it unlinks the name. A process that opened the name just before that
  unlink still holds complete bytes, but sees that the name no longer points at its file and
  starts over; so every mapped segment can be reached by name (the CPU sidecar's workers attach
  by name, without locks, while their instance holds the segment).

A segment nobody holds is garbage: `remove_idle(prefix)` unlinks those, which is always safe,
and is how a launcher cleans up after a killed instance (its locks die with it).

`SharedDir` applies the same protocol to a directory (the adapter files that Ray instance
actors of one node write once and share, so that their segments' names agree).
"""
from __future__ import annotations

import errno
import fcntl
import glob
import logging
import mmap
import os
import shutil
import uuid
from typing import Callable

__all__ = ["SHM_DIR", "Segment", "SharedDir", "attach_or_make", "remove_idle"]

SHM_DIR = "/dev/shm"
log = logging.getLogger("caraserve.lora.segments")


class Segment:
    """One mapped segment; holds a shared lock on it until `close`."""

    def __init__(self, name: str, fd: int, size: int):
        self.name = name
        self.size = size
        self._fd = fd
        self.buf = mmap.mmap(fd, size)  # (mmap dups the fd: the lock lives while either is open)

    def close(self) -> bool:
        """Unmap; unlink the name when no other process maps it. True if this unlinked it."""
        unlinked = False
        if self._fd < 0:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another process maps it: it stays
        else:
            unlinked = _unlink_if_same(self.name, self._fd)
        try:
            self.buf.close()
        except BufferError:  # a view is still alive somewhere: the mapping (and its lock) goes with it
            pass
        os.close(self._fd)
        self._fd = -1
        return unlinked


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _same_file(name: str, fd: int) -> bool:
    return _same_path(_path(name), fd)


def _same_path(path: str, fd: int) -> bool:
    """Does `path` still name the file open as `fd` (not unlinked, not remade)?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _unlink_if_same(name: str, fd: int) -> bool:
    if not _same_file(name, fd):
        return False
    try:
        os.unlink(_path(name))
        return True
    except FileNotFoundError:
        return False


def _attach(name: str, size: int) -> Segment | None:
    """The complete segment `name` with a shared lock taken, or None if there is none."""
    try:
        fd = os.open(_path(name), os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an unlinker's brief exclusive lock
        if not _same_file(name, fd):  # unlinked (and maybe remade) between our open and lock
            os.close(fd)
            return None
        actual = os.fstat(fd).st_size
        if actual != max(1, size):
            raise OSError(errno.EINVAL, f"shared segment {name} holds {actual} bytes, expected {max(1, size)}")
        return Segment(name, fd, max(1, size))
    except BaseException:
        os.close(fd)
        raise


def _make(name: str, size: int, fill: Callable[[Segment], None]) -> Segment | None:
    """Fill a private file and link it to `name`; None when another maker linked first."""
    tmp = f"{name}.tmp{os.getpid()}_{uuid.uuid4().hex[:8]}"  # starts with the prefix: remove_idle sees it
    fd = os.open(_path(tmp), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    segment = None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # so remove_idle leaves it alone while it fills
        os.ftruncate(fd, max(1, size))  # reads as zeros
        segment = Segment(name, fd, max(1, size))
        fill(segment)
        try:
            os.link(_path(tmp), _path(name))
        except FileExistsError:
            segment.name = tmp  # not ours to publish: dropped below, theirs is used
            segment.close()
            return None
        return segment
    except BaseException:
        if segment is not None:
            segment.name = tmp
            segment.close()
        else:
            os.close(fd)
        raise
    finally:
        try:
            os.unlink(_path(tmp))
        except FileNotFoundError:
            pass


def attach_or_make(name: str, size: int, fill: Callable[[Segment], None]) -> Segment:
    """Map segment `name` of `size` bytes: another process's copy if there is one, else a new
    one filled by `fill(segment)` (its exceptions propagate; nothing is published then)."""
    for _ in range(100):
        segment = _attach(name, size)
        if segment is None:
            segment = _make(name, size, fill)
        if segment is not None:
            return segment
    raise OSError(errno.EAGAIN, f"shared segment {name}: could not map it (made and removed by others 100 times)")


def remove_idle(prefix: str) -> list[str]:
    """Unlink every segment under `prefix` that no process holds; returns their names."""
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _unlink_if_same(os.path.basename(path), fd):
                removed.append(os.path.basename(path))
        except OSError:
            pass  # held: in use
        finally:
            os.close(fd)
    return removed


class SharedDir:
    """A directory that processes of one host hold together; the last to `release` removes it.

    Holders keep a shared lock on the directory itself; a releaser that gets the exclusive lock
    removes the tree. Files put in it with `put_dir` appear whole or not at all."""

    def __init__(self, path: str):
        self.path = path
        for _ in range(100):
            os.makedirs(path, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:  # removed by a releaser between the two calls
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _same_path(path, fd):
                self._fd = fd
                return
            os.close(fd)
        raise OSError(errno.EAGAIN, f"shared directory {path}: removed by others 100 times while opened")

    def put_dir(self, name: str, write: Callable[[str], None]) -> str:
        """`path/name`, made by `write(tmp_dir)` unless another holder made it already."""
        final = os.path.join(self.path, name)
        if os.path.isdir(final):
            return final
        tmp = os.path.join(self.path, f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            write(tmp)
            os.rename(tmp, final)  # atomic; fails when another holder's copy is there already
        except OSError:
            if not os.path.isdir(final):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def release(self) -> bool:
        """Stop holding it; remove it when nobody else does. True if this removed it."""
        if self._fd < 0:
            return False
        removed = False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # another process holds it
        else:
            if _same_path(self.path, self._fd):
                shutil.rmtree(self.path, ignore_errors=True)
                removed = True
        os.close(self._fd)
        self._fd = -1
        return removed
