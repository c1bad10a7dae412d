"""Content hashes: canonical digests of JSON-able parts (cache keys, fingerprints) and memoised file sha256.

Files are hashed through :func:`gmner.core.files.open_input`: only regular files (a FIFO or device named as a
model file is a :class:`gmner.core.files.Refused`, not a hang), streamed, of any size (model weights are GBs).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from gmner.core.atomic import write_text
from gmner.core.files import open_input


def digest(*parts) -> str:
    """sha256 over canonical JSON of ``parts``: the one way keys and fingerprints are derived."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path, memo: str | Path | None = None) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns, str(memo) if memo else None)


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int, memo: str | None) -> str:
    memo_file = Path(memo) / f"{digest(path, size, mtime_ns)[:32]}.sha256" if memo else None
    if memo_file is not None and memo_file.exists():
        return memo_file.read_text().strip()
    sha = hashlib.sha256()
    with open_input(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    if memo_file is not None:
        write_text(memo_file, sha.hexdigest())
    return sha.hexdigest()
