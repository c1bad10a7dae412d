"""The per-item stage runner shared by detect, caption, synthesize and features.

A per-item stage maps items (an image, a tweet) to model results. DVC would rerun all of them whenever any
dependency changes, so results live in a content-addressed :class:`gmner.vision.cache.ItemCache` and a stage
rebuilds its Parquet outputs in full from the cache. Interface, for a stage author::

    items = [Item(key=sha256, payload=path), ...]          # key: content key, unique
    cache = ItemCache(cache_root, "detect", digest(model_fingerprint(...), result_params))
    run = run_items(items, cache=cache, load=load_fn, compute=compute_fn, codec=JSON, policy=cfg["policy"],
                    batch_size=8, num_workers=2, desc="detect")
    if run.is_main:
        write_parquet(out, rows_from(run))     # run.outcome(key): (result, None) or (None, skip reason)
        write_summary(summary_path, run.summary, "detect")

- ``load(payload)`` runs in DataLoader worker processes (``num_workers``; 0: in this process) and returns
  anything picklable, e.g. a decoded image. Raising :class:`gmner.core.errors.DataError` marks the item bad: its
  ``kind`` attribute is looked up in ``policy`` (reason -> action, read into a
  :class:`gmner.core.errors.Policy` of this run): ``error`` stops the stage with the message, anything else skips
  the item, counted in the summary and listed with its reason in ``run.skipped``. Skipped items get no
  result and are not cached (a missing file may appear later). A DataError with no ``kind``, or one the policy
  does not name, stops the stage (e.g. an image whose bytes changed since prepare, see
  :class:`gmner.vision.inputs.PreparedImage`).
- ``compute(loaded_list)`` runs in this process on one batch and returns one result per element, in order.
  Only cache misses reach it.
- ``codec`` turns a result into cache bytes and back. Every result a stage sees is decoded from the cache,
  so a fresh result and a cached one are the same object graph and outputs are byte-identical whether
  computed now or earlier.

Each finished batch is written to the cache at once (atomic per entry): a killed run loses at most the batch
in flight and a rerun resumes. Corrupt entries (damaged, not a file, or not decodable by ``codec``) are
counted, removed and recomputed.

Memory: the runner holds the keys, the skip reasons and one batch (its loaded inputs and results), never
all results: ``run.results`` decodes each result from the cache when it is read. A stage that reads them
once, in key order, while it writes its table (features writes its big tables in row groups) holds one
result or one row group at a time, whatever the number of items; real-size patch tokens are ~600 KB an image.

Sharding: when ``torch.distributed`` is initialised (``accelerate launch``, torchrun, or
:func:`stage_device` from their environment), rank r computes the misses of ``sorted(items)[r::world]``
into the shared cache; after a collective every rank can read every result, and rank 0, the only one with
``is_main`` and a summary, writes outputs equal to a one-process run. Launch N processes with
``torchrun --standalone --nproc_per_node N stages/<stage>.py`` (CPU: gloo; GPUs: NCCL, one per rank) or
``accelerate launch --multi_gpu --num_processes N ...``; accelerate's ``--cpu`` launcher starts a single
process unless MPI is configured.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from gmner.core.atomic import write_json
from gmner.core.errors import DataError, Policy
from gmner.core.params import resolve_device
from gmner.vision.cache import ItemCache, decode_arrays, decode_json, encode_arrays, encode_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Codec:
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


JSON = Codec(encode_json, decode_json)  # dicts / lists of str, int, float, bool, None
ARRAYS = Codec(encode_arrays, decode_arrays)  # dict[str, np.ndarray]
RAW = Codec(bytes, bytes)  # bytes as they are (e.g. an encoded PNG)


@dataclass(frozen=True)
class Item:
    key: str  # content key: what the result depends on besides the stage fingerprint
    payload: Any = None  # what ``load`` needs (a path, a dict); never part of the key


class CachedResults(Mapping[str, Any]):
    """key -> result of every item that has one, in key order, decoded from the cache on each read.

    Nothing is kept in memory. Read each result once (in key order while writing a table), or copy the
    mapping with ``dict()`` when small results are looked up many times.
    """

    def __init__(self, keys: Sequence[str], cache: ItemCache, codec: Codec, desc: str):
        self._keys = dict.fromkeys(sorted(keys))
        self._cache, self._codec, self._desc = cache, codec, desc

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        blob = self._cache.get(key)
        if blob is None:  # deleted or damaged since it was computed or found
            raise RuntimeError(f"{self._desc}: the cache entry of item {key} vanished or is corrupt; run again")
        return self._codec.decode(blob)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys


@dataclass
class StageRun:
    results: Mapping[str, Any]  # key -> decoded result, in key order, read from the cache on access
    summary: dict  # empty on ranks other than 0
    is_main: bool
    skipped: dict[str, str] = field(default_factory=dict)  # key -> policy reason of each skipped item, sorted

    def outcome(self, key: str) -> tuple[Any, str | None]:
        """``(result, None)``, or ``(None, reason)`` for an item the policy skipped."""
        if key in self.skipped:
            return None, self.skipped[key]
        return self.results[key], None


def run_items(
    items: Sequence[Item],
    *,
    cache: ItemCache,
    compute: Callable[[list], list],
    policy: Mapping[str, str],
    load: Callable[[Any], Any] | None = None,
    codec: Codec = JSON,
    batch_size: int = 8,
    num_workers: int = 0,
    desc: str = "items",
) -> StageRun:
    """Look up every item, compute only the misses in batches, cache each batch as it finishes."""
    start = time.perf_counter()
    ordered = sorted(items, key=lambda item: item.key)
    keys = [item.key for item in ordered]
    if len(set(keys)) != len(keys):
        dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"{desc}: duplicate item keys, e.g. {dupes[:3]}")
    rank, world = _rank_and_world()
    shard = ordered[rank::world]

    corrupt_before = cache.corrupt
    misses = [item for item in shard if not _cached(cache, item.key, codec)]  # decodes each hit, keeps none
    counts = Counter(cache_hits=len(shard) - len(misses), corrupt_entries=cache.corrupt - corrupt_before)
    label = f"{desc} [rank {rank}/{world}]" if world > 1 else desc
    batches = _load_batches(misses, load, batch_size, num_workers)
    actions = Policy(policy)  # this run's counts only
    skipped = _compute_misses(batches, len(misses), cache, compute, actions, codec, counts, label)

    skips = actions.report()
    if world > 1:
        reports = _all_gather({"counts": counts, "skips": skips, "skipped": skipped})
        counts = sum((Counter(r["counts"]) for r in reports), Counter())
        skips = _merge_skip_reports([r["skips"] for r in reports])
        skipped = {key: reason for r in reports for key, reason in r["skipped"].items()}
    results = CachedResults([key for key in keys if key not in skipped], cache, codec, desc)
    skipped = dict(sorted(skipped.items()))
    if rank != 0:
        return StageRun(results, {}, is_main=False, skipped=skipped)

    wall = time.perf_counter() - start
    summary = {
        "items": len(ordered),
        "results": len(results),
        "cache_hits": counts["cache_hits"],
        "model_calls": counts["model_calls"],
        "batches": counts["batches"],
        "corrupt_entries": counts["corrupt_entries"],
        "skipped": skips["counts"],
        "skip_examples": skips["first_example"],
        "processes": world,
        "wall_s": round(wall, 3),
        "items_per_s": round(len(ordered) / wall, 2) if wall > 0 else None,
    }
    return StageRun(results, summary, is_main=True, skipped=skipped)


def combined_summary(runs: Mapping[str, StageRun]) -> dict:
    """The summary of a stage of several passes: each pass's under its name, and their totals."""
    return {
        **{name: run.summary for name, run in runs.items()},
        "model_calls": sum(run.summary["model_calls"] for run in runs.values()),
        "cache_hits": sum(run.summary["cache_hits"] for run in runs.values()),
        "wall_s": round(sum(run.summary["wall_s"] for run in runs.values()), 3),
    }


def write_summary(path: str | Path, summary: dict, stage: str) -> None:
    """Write a stage's summary JSON and log its model calls and cache hits."""
    write_json(path, summary)
    log.info("%s: %d model calls, %d cache hits; summary in %s", stage, summary["model_calls"],
             summary["cache_hits"], path)


def _cached(cache: ItemCache, key: str, codec: Codec) -> bool:
    """Whether ``key`` has an entry ``codec`` can decode; one it cannot is invalidated (counted corrupt)."""
    blob = cache.get(key)
    if blob is None:
        return False
    try:
        codec.decode(blob)
    except Exception:  # whatever a codec raises on checksummed bytes, the entry is bad: recompute it
        cache.invalidate(key)
        return False
    return True


def _load_batches(misses: list[Item], load, batch_size: int, num_workers: int):
    """Batches of (key, loaded, bad) with loading in DataLoader workers."""
    if not misses:
        return []
    import torch.utils.data

    dataset = _LoadDataset(misses, load)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)


def _compute_misses(batches, total, cache, compute, policy, codec, counts, desc) -> dict[str, str]:
    """Compute each loaded batch and cache its results as soon as it is done; return the skips."""
    from tqdm import tqdm

    skipped: dict[str, str] = {}
    # disable=None: a bar on a terminal, nothing in piped logs (the summary JSON has the rates)
    with tqdm(total=total, desc=desc, unit="item", dynamic_ncols=True, disable=True if total == 0 else None) as bar:
        for batch in batches:
            good = []
            for key, loaded, bad in batch:
                if bad is None:
                    good.append((key, loaded))
                else:
                    reason, where, message = bad
                    if reason not in policy.actions:
                        raise DataError(where, message)
                    policy.handle(reason, where, message)  # raises DataError when the policy says error
                    skipped[key] = reason
            if good:
                outputs = compute([loaded for _, loaded in good])
                if len(outputs) != len(good):
                    raise RuntimeError(f"{desc}: compute returned {len(outputs)} results for {len(good)} items")
                for (key, _), output in zip(good, outputs):
                    cache.put(key, codec.encode(output))
                counts["model_calls"] += len(good)
                counts["batches"] += 1
            bar.update(len(batch))
    return skipped


class _LoadDataset:
    """Map-style dataset over miss items; bad items come back as data so one file cannot kill a worker."""

    def __init__(self, items: list[Item], load: Callable[[Any], Any] | None):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if self.load is None:
            return item.key, item.payload, None
        try:
            return item.key, self.load(item.payload), None
        except DataError as exc:
            # Exceptions with custom __init__ do not pickle across workers: send the parts instead.
            return item.key, None, (getattr(exc, "kind", None), exc.where, exc.reason)


def _merge_skip_reports(reports: list[dict]) -> dict:
    counts: Counter = Counter()
    examples: dict = {}
    for report in reports:  # rank order: the lowest rank's first example wins
        counts.update(report["counts"])
        for reason, example in report["first_example"].items():
            examples.setdefault(reason, example)
    return {"counts": dict(sorted(counts.items())), "first_example": dict(sorted(examples.items()))}


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)  # also the barrier: every rank has finished its shard
    return gathered


def stage_device(name: str):
    """The torch device of a per-item stage: ``name`` (``base.device``), or this rank's device when a launcher
    (``accelerate launch``, torchrun) described a process group in the environment, which this joins."""
    from accelerate import PartialState

    device = resolve_device(name)
    state = PartialState(cpu=device.type == "cpu")  # a plain single process gets a non-distributed state
    return state.device if state.num_processes > 1 else device
