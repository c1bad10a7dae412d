"""Content-addressed per-item cache, outside DVC's outputs.

DVC reruns a whole stage when any dependency changes; the per-item stages (detect, caption, synthesize,
features) therefore keep every model result here, keyed by the item's content plus a fingerprint of the
model and the stage params that affect it, and rebuild their Parquet outputs in full from the cache.
A re-run after adding tweets costs model calls for the new items only.

Entries are written atomically (temp file + rename) and carry a sha256 of their payload, so a run killed
at any moment leaves either a whole entry or none, and a corrupted entry is detected and recomputed.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from gmner.core.atomic import write_bytes

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
            blob = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        head, payload = blob[: len(_MAGIC) + 32], blob[len(_MAGIC) + 32 :]
        if head[: len(_MAGIC)] != _MAGIC or head[len(_MAGIC) :] != hashlib.sha256(payload).digest():
            path.unlink(missing_ok=True)
            self.corrupt += 1
            self.misses += 1
            return None
        self.hits += 1
        return payload

    def put(self, key: str, payload: bytes) -> None:
        write_bytes(self._path(key), _MAGIC + hashlib.sha256(payload).digest() + payload)

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
