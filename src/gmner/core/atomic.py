"""Atomic file writes: a reader never sees a half-written output, and a killed run leaves none."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; swap it in for ``path`` only if the block succeeds.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed aside: a run killed
    between the two renames leaves ``path`` absent (never half written) and the stage simply runs again.
    Leftovers of killed runs are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(f".{path.name}.*.old")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private; outputs are not
    try:
        yield tmp
        old = tmp.with_suffix(".old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    with parquet_writer(path, table.schema) as writer:
        writer.write_table(table)


@contextlib.contextmanager
def parquet_writer(path: str | os.PathLike, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A writer of row groups (``write_table`` each) onto ``path``, renamed in only if the block succeeds: a
    table too big for memory is written group by group."""
    # No statistics timestamps or writer-dependent metadata beyond the schema, so equal tables give equal bytes.
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
        yield writer
