"""The order in which the one training loop visits a split: seeded batches, length grouping, each process's
shard, and the DataLoader that collates them off the training thread.

An epoch is a list of *global* batches (``batch_size`` sentences per process, so ``batch_size x processes``
in all); process ``rank`` trains on its contiguous slice of each. With one process and no length grouping
the batches are ``randperm(n).split(batch_size)``, the loop's order before multi-process training existed.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, lengths: Sequence[int] | None = None,
                  chunk: int = 50) -> list[list[int]]:
    """One epoch's batches of ``batch_size`` indices of ``range(n)``, drawn from ``generator``.

    With ``lengths`` (subword lengths), batches are length-grouped as in HF's ``group_by_length``: a random
    permutation is cut into chunks of ``chunk`` batches, each chunk sorted by length (longest first) and cut
    into batches, and the batches are shuffled, except that the one holding the longest sentence goes first,
    so an out-of-memory error shows at the first step rather than hours in.
    """
    order = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [order[i: i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    for start in range(0, n, batch_size * chunk):
        part = sorted(order[start: start + batch_size * chunk], key=lambda i: -lengths[i])  # stable: seeded ties
        batches.extend(part[i: i + batch_size] for i in range(0, len(part), batch_size))
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    batches.insert(0, batches.pop(longest))
    return batches


def length_grouped_batches(lengths: Sequence[int], batch_size: int, chunk: int,
                           generator: torch.Generator) -> list[list[int]]:
    """``epoch_batches`` of a split with these subword ``lengths``, length-grouped."""
    return epoch_batches(len(lengths), batch_size, generator, lengths, chunk)


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of positions that are padding once each batch is padded to its longest sentence."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


def shard(batches: list[list[int]], rank: int, processes: int) -> list[list[int]]:
    """Process ``rank``'s contiguous slice of each global batch (``processes`` x batch_size sentences, the
    last one fewer). So that every process gets a non-empty share of every batch, the last batch is padded to
    a multiple of ``processes`` with the epoch's first indices, as torch's DistributedSampler pads."""
    if processes == 1:
        return batches
    first = [i for b in batches for i in b] * processes  # cycled, for splits smaller than ``processes``
    first = first[: -len(batches[-1]) % processes]
    out = []
    for b in [*batches[:-1], batches[-1] + first]:
        share = len(b) // processes
        out.append(b[rank * share: (rank + 1) * share])
    return out


class _Collated(torch.utils.data.Dataset):
    """A split whose items are whole batches: ``dataset[indices]`` is ``data.batch(indices)``."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, indices):
        return self.data.batch(indices)


def _as_is(batch):  # the batch a model's collate made, untouched (default_convert would turn numpy into tensors)
    return batch


def loader(data, batches: list[list[int]], workers: int, pin_memory: bool) -> DataLoader | list:
    """The batches collated in order: in the training thread (``workers`` 0) or in worker processes, which
    see the state ``data.start_epoch`` set, since they start with each epoch."""
    if workers == 0:
        return batches
    return DataLoader(_Collated(data), batch_size=None, sampler=batches, num_workers=workers,
                      collate_fn=_as_is, pin_memory=pin_memory, multiprocessing_context="fork")


def to_device(batch: dict, device: torch.device) -> dict:
    """A worker's batch moved to ``device``: its tensors (non-tensor values, e.g. lists of boxes, stay)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
