"""The per-item stage runner shared by detect, caption, synthesize and features.

A per-item stage maps items (an image, a tweet) to model results. DVC would rerun all of them whenever any
dependency changes, so results live in a content-addressed :class:`gmner.cache.ItemCache` and a stage
rebuilds its Parquet outputs in full from :func:`run_items`' return value. Interface, for a stage author::

    items = [Item(key=sha256, payload=path), ...]          # key: content key, unique
    cache = ItemCache(cache_root, "detect", digest(model_fingerprint(...), result_params))
    run = run_items(items, cache=cache, load=load_fn, compute=compute_fn, codec=JSON, policy=policy,
                    batch_size=8, num_workers=2, desc="detect")
    if run.is_main:
        write_parquet(out, rows_from(run.results))         # run.results: key -> result, sorted by key
        write_json(summary_path, run.summary)

- ``load(payload)`` runs in DataLoader worker processes (``num_workers``; 0: in this process) and returns
  anything picklable, e.g. a decoded image. Raising :class:`gmner.errors.DataError` marks the item bad: its
  ``kind`` attribute (``"bad_item"`` when absent) is looked up in ``policy``: ``error`` stops the stage with
  the message, anything else skips the item, counted in the summary and listed with its reason in
  ``run.skipped``. Skipped items get no result and are not cached (a missing file may appear later).
- ``compute(loaded_list)`` runs in this process on one batch and returns one result per element, in order.
  Only cache misses reach it.
- ``codec`` turns a result into cache bytes and back. Every returned result has been through encode and
  decode, so a fresh result and a cached one are the same object graph and outputs are byte-identical
  whether computed now or earlier.

Each finished batch is written to the cache at once (atomic per entry): a killed run loses at most the batch
in flight and a rerun resumes. Corrupt entries are detected by the cache and recomputed.

Sharding: when ``torch.distributed`` is initialised (``accelerate launch``, torchrun, or
:func:`init_distributed` from their environment), rank r computes the misses of ``sorted(items)[r::world]``
into the shared cache; after a collective, rank 0 reads every other result from the cache, so its outputs
equal a one-process run. Only rank 0 has ``is_main`` and the results. Launch N processes with
``torchrun --standalone --nproc_per_node N stages/<stage>.py`` (CPU: gloo; GPUs: NCCL, one per rank) or
``accelerate launch --multi_gpu --num_processes N ...``; accelerate's ``--cpu`` launcher starts a single
process unless MPI is configured.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from gmner.atomic import write_text
from gmner.cache import ItemCache, decode_arrays, decode_json, digest, encode_arrays, encode_json
from gmner.errors import DataError, Policy


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


@dataclass
class StageRun:
    results: dict[str, Any]  # key -> decoded result, sorted by key; empty on ranks other than 0
    summary: dict
    is_main: bool
    skipped: dict[str, str] = field(default_factory=dict)  # key -> policy reason of each skipped item, sorted


def run_items(
    items: Sequence[Item],
    *,
    cache: ItemCache,
    compute: Callable[[list], list],
    policy: Policy,
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

    results: dict[str, Any] = {}
    misses: list[Item] = []
    corrupt_before = cache.corrupt
    for item in shard:
        blob = cache.get(item.key)
        if blob is None:
            misses.append(item)
        else:
            results[item.key] = codec.decode(blob)
    counts = Counter(cache_hits=len(shard) - len(misses), corrupt_entries=cache.corrupt - corrupt_before)
    label = f"{desc} [rank {rank}/{world}]" if world > 1 else desc
    batches = _load_batches(misses, load, batch_size, num_workers)
    skipped = _compute_misses(batches, len(misses), results, cache, compute, policy, codec, counts, label)

    skips = policy.report()
    if world > 1:
        reports = _all_gather({"counts": counts, "skips": skips, "skipped": skipped})
        counts = sum((Counter(r["counts"]) for r in reports), Counter())
        skips = _merge_skip_reports([r["skips"] for r in reports])
        skipped = {key: reason for r in reports for key, reason in r["skipped"].items()}
        if rank != 0:
            return StageRun({}, {}, is_main=False)
        for item in ordered:
            if item.key not in results and item.key not in skipped:
                blob = cache.get(item.key)
                if blob is None:
                    raise RuntimeError(f"{desc}: item {item.key} was neither cached nor skipped by its rank")
                results[item.key] = codec.decode(blob)

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
    return StageRun(dict(sorted(results.items())), summary, is_main=True, skipped=dict(sorted(skipped.items())))


def _load_batches(misses: list[Item], load, batch_size: int, num_workers: int):
    """Batches of (key, loaded, bad) with loading in DataLoader workers."""
    if not misses:
        return []
    import torch.utils.data

    dataset = _LoadDataset(misses, load)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)


def _compute_misses(batches, total, results, cache, compute, policy, codec, counts, desc) -> dict[str, str]:
    """Compute each loaded batch, store and keep each result as soon as its batch is done; return the skips."""
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
                    policy.handle(reason, where, message)  # raises DataError when the policy says error
                    skipped[key] = reason
            if good:
                outputs = compute([loaded for _, loaded in good])
                if len(outputs) != len(good):
                    raise RuntimeError(f"{desc}: compute returned {len(outputs)} results for {len(good)} items")
                for (key, _), output in zip(good, outputs):
                    blob = codec.encode(output)
                    cache.put(key, blob)
                    results[key] = codec.decode(blob)
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
            return item.key, None, (getattr(exc, "kind", "bad_item"), exc.where, exc.reason)


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


def init_distributed(cpu: bool):
    """Join the process group a launcher (``accelerate launch``, torchrun) described in the environment.

    A plain single process gets a non-distributed state. Returns accelerate's ``PartialState``, whose
    ``device`` is this rank's device when distributed.
    """
    from accelerate import PartialState

    return PartialState(cpu=cpu)


# --- model fingerprints ---------------------------------------------------------------------------------


class ModelUnavailable(FileNotFoundError):
    """A model reference that is neither built here, a local path, nor in the local Hugging Face cache."""


def model_fingerprint(ref: str, *, config: dict | None = None, seed: int | None = None,
                      revision: str | None = None, hash_memo: str | Path | None = None) -> str:
    """A digest that changes exactly when the model's results may change.

    - ``ref == "tiny"`` or starting with ``"tiny"``: random weights built from ``config`` with ``seed``.
    - an existing local file or folder: every file's relative path and content sha256 (config, weights,
      tokenizer). Hashes are memoised per (path, size, mtime) in ``hash_memo`` (a folder) when given, so
      multi-GB weights are read once, not on every run.
    - otherwise a hub id, which must already be in the local Hugging Face cache (no hub is reachable):
      the id plus the cached commit of ``revision``.
    """
    if ref.startswith("tiny"):
        return digest("tiny", ref, config, seed)
    path = Path(ref).expanduser()
    if path.is_file():
        return digest("local", [(path.name, file_sha256(path, hash_memo))])
    if path.is_dir():
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        files = [f for f in files if not any(part.startswith(".") for part in Path(f).parts)]  # .git, .cache
        if not files:
            raise ModelUnavailable(f"model folder {ref!r} holds no files")
        return digest("local", [(f, file_sha256(path / f, hash_memo)) for f in files])
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise ModelUnavailable(
            f"model {ref!r}{'@' + revision if revision else ''} is not a local path and not in the Hugging Face "
            "cache, and no model hub is reachable from here: download it on a connected machine and pass its "
            "folder, or use a tiny random-weight model"
        )
    commit = Path(cached).parent.name  # .../snapshots/<commit>/config.json
    return digest("hub", ref, commit)


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
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    if memo_file is not None:
        write_text(memo_file, sha.hexdigest())
    return sha.hexdigest()
