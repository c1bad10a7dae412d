"""Content-addressed per-item cache, outside DVC's outputs.

DVC reruns a whole stage when any dependency changes; the per-item stages (detect, caption, synthesize,
features) therefore keep every model result here, keyed by the item's content plus a fingerprint of the
model and the stage params that affect it, and rebuild their Parquet outputs in full from the cache.
A re-run after adding tweets costs model calls for the new items only.

Entries are written atomically (temp file + rename) and carry a sha256 of their payload, so a run killed
at any moment leaves either a whole entry or none. Anything else found where an entry should be (damaged
bytes, a directory, a FIFO, an unreadable file, a payload its codec cannot decode) is a ``corrupt`` entry:
removed, counted, and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from gmner.core.atomic import write_bytes
from gmner.core.files import Refused, open_input

_MAGIC = b"GMNC1"


def encode_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_json(blob: bytes):
    return json.loads(blob)


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


class ItemCache:
    """Bytes per item key under ``root/namespace/fingerprint[:16]``; ``hits``, ``misses``, ``corrupt`` count lookups."""

    def __init__(self, root: str | Path, namespace: str, fingerprint: str):
        self.dir = Path(root) / namespace / fingerprint[:16]
        self.fingerprint = fingerprint
        self.hits = self.misses = self.corrupt = 0

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.bin"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open_input(path) as fh:
                blob = fh.read()
        except Refused as exc:
            if exc.kind != "missing" or os.path.lexists(path):  # a directory, a FIFO, a dangling link, ...
                return self.invalidate(key)
            self.misses += 1
            return None
        except OSError:  # unreadable
            return self.invalidate(key)
        head, payload = blob[: len(_MAGIC) + 32], blob[len(_MAGIC) + 32 :]
        if head[: len(_MAGIC)] != _MAGIC or head[len(_MAGIC) :] != hashlib.sha256(payload).digest():
            return self.invalidate(key)
        self.hits += 1
        return payload

    def invalidate(self, key: str) -> None:
        """Count the entry of ``key`` as corrupt (a miss) and remove whatever is in its place; returns None."""
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        self.corrupt += 1
        self.misses += 1

    def put(self, key: str, payload: bytes) -> None:
        path = self._path(key)
        if os.path.lexists(path.parent) and not path.parent.is_dir():  # a file where the shard folder goes
            path.parent.unlink()
        write_bytes(path, _MAGIC + hashlib.sha256(payload).digest() + payload)

    def get_json(self, key: str):
        blob = self.get(key)
        return None if blob is None else decode_json(blob)

    def put_json(self, key: str, obj) -> None:
        self.put(key, encode_json(obj))

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        blob = self.get(key)
        return None if blob is None else decode_arrays(blob)

    def put_arrays(self, key: str, **arrays: np.ndarray) -> None:
        self.put(key, encode_arrays(arrays))

    def stats(self) -> dict:
        return {"cache_hits": self.hits, "cache_misses": self.misses, "corrupt_entries": self.corrupt}
