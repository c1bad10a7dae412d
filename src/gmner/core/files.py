"""Bounded, contained reads of input files: the one way dataset and prediction inputs are opened.

A dataset names files (an image, an xml, a CoNLL or JSONL file) that may be anything: a FIFO that blocks
forever, a link to ``/dev/zero`` that never ends, a directory, a multi-GB file, or a link out of the folder
the params name. :func:`read_input` reads only regular files, at most ``limit`` bytes, optionally only under
``root`` (after resolving every link), and never blocks on opening: a refusal is a :class:`Refused` naming the
file, with a ``kind`` the caller maps to its own policy reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from gmner.core.errors import DataError

MiB = 1 << 20
IMAGE_BYTES = 64 * MiB  # one image file: 4x a 50-megapixel JPEG at high quality
XML_BYTES = 16 * MiB  # one Pascal VOC file: thousands of objects
TEXT_BYTES = 1024 * MiB  # one CoNLL or JSONL file: 100x Twitter10000's train split

REFUSALS = ("missing", "not_regular", "too_large", "outside")


class Refused(DataError):
    """A file :func:`read_input` would not read; ``kind`` is one of :data:`REFUSALS`."""

    def __init__(self, path: str | os.PathLike, kind: str, message: str):
        super().__init__(Path(path).as_posix(), message)
        self.kind = kind


def read_input(path: str | os.PathLike, limit: int, root: str | os.PathLike | None = None) -> bytes:
    """The bytes of the regular file ``path`` (links followed), at most ``limit`` of them; with ``root``, the
    resolved file must lie under the resolved ``root``. Anything else raises :class:`Refused`."""
    with open_input(path, limit, root) as fh:
        size = os.fstat(fh.fileno()).st_size
        data = fh.read(size + 1)  # not read(limit + 1), which allocates the whole cap up front
        if len(data) > size:  # grown since the check: read on, up to one byte past the cap
            data += fh.read(limit + 1 - len(data))
    if len(data) > limit:
        raise Refused(path, "too_large", f"more than {limit} bytes")
    return data


@contextlib.contextmanager
def open_input(path: str | os.PathLike, limit: int | None = None,
               root: str | os.PathLike | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for reading as :func:`read_input` checks it (``limit`` None: any size), for streaming."""
    real = contained(path, root)
    try:
        info = os.stat(real)  # before opening: opening a device or FIFO can block or have effects
    except FileNotFoundError:
        raise Refused(path, "missing", "no such file") from None
    except OSError as exc:  # a link loop, a name too long, a component that is not a folder
        raise Refused(path, "missing", f"cannot be read: {exc.strerror}") from None
    _check(path, info, limit)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:  # replaced by a link, or removed, since the check
        raise Refused(path, "missing", f"cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        _check(path, os.fstat(fd), limit)  # the file opened is the one checked
        yield fh


def contained(path: str | os.PathLike, root: str | os.PathLike | None) -> str:
    """``path`` with every link resolved; with ``root``, :class:`Refused` (``outside``) unless it resolves
    under the resolved ``root`` (which may itself be a link, e.g. an images folder on another disk)."""
    try:
        real = os.path.realpath(path)
    except ValueError:  # an embedded NUL
        raise Refused(path, "missing", "not a valid file name") from None
    if root is not None:
        top = os.path.realpath(root)
        if os.path.commonpath([top, real]) != top:
            raise Refused(path, "outside", f"resolves to {Path(real).as_posix()}, outside {Path(top).as_posix()}")
    return real


def _check(path, info: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise Refused(path, "not_regular", f"not a regular file (a {_file_type(info.st_mode)})")
    if limit is not None and info.st_size > limit:
        raise Refused(path, "too_large", f"{info.st_size} bytes, more than the {limit} allowed")


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
