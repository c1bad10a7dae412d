"""Target sequences of the index-generation model and their constrained greedy / beam decoding.

A tweet's entities become one symbol sequence, entities ordered by start, then EOS. Two heads:

- ``hierarchical`` (H-Index, Yu et al. 2023; DLRAM's fine-tuning): per entity its start word, end word, an
  indicator (GROUNDABLE / UNGROUNDABLE) and its type. The symbols live in one joint index space

      [EOS, GROUNDABLE, UNGROUNDABLE, type_0 .. type_{T-1}]  [word_0 .. word_{W-1}]

  and the candidate of a groundable entity is NOT a symbol: the model reads a separate distribution over
  the K candidates from the decoder state whose input is the GROUNDABLE indicator (the step that predicts
  the type; :func:`region_steps`). The public NUSTM/GMNER code emits the indicator before the type too.
- ``flat`` (this pipeline's first head, kept for comparison): per entity start, end, type and one region
  symbol, NO_REGION or a candidate, in the joint space

      [EOS, NO_REGION, type_0 .. type_{T-1}]  [word_0 .. word_{W-1}]  [region_0 .. region_{K-1}]

  so the groundable decision is made by the same pointer step that picks the candidate.

Words are the tweet's ENCODED words (those with a first subword, in order) and regions its detector
candidates, both padded to the batch's W and K. Decoding follows a state machine (:func:`allowed`): only
valid next symbols can be chosen, so every decoded sequence parses back into non-overlapping entities.
Beam search keeps ``beam_size`` hypotheses per tweet scored by summed log-probability; with ``beam_size`` 1
it picks exactly what greedy does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

HEADS = ("hierarchical", "flat")
EOS = 0
NO_REGION = 1  # flat: the region symbol of "none" (visual_store.NONE is its option index)
GROUNDABLE, UNGROUNDABLE = 1, 2  # hierarchical: the indicators
BOS = -1  # the decoder's first input; never an output (the model embeds it separately)
SYMBOLS_PER_ENTITY = 4


class Entity(NamedTuple):
    """An entity in encoded-word indices: ``start`` .. ``end`` inclusive, type index, region index or None."""

    start: int
    end: int
    type: int
    region: int | None


@dataclass(frozen=True)
class Layout:
    """Where each kind of symbol sits in the joint index space of a batch."""

    n_types: int
    n_words: int  # W: encoded words of the batch's longest tweet
    n_regions: int  # K: candidates of the batch's image with most
    head: str = "flat"

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    @property
    def first_type(self) -> int:
        return 3 if self.head == "hierarchical" else 2

    @property
    def word0(self) -> int:
        return self.first_type + self.n_types

    @property
    def region0(self) -> int:
        """Flat: the first region symbol. Hierarchical: the end of the space (regions are not symbols)."""
        return self.word0 + self.n_words

    @property
    def size(self) -> int:
        return self.region0 + (self.n_regions if self.head == "flat" else 0)


@dataclass(frozen=True)
class Constraints:
    """What one tweet allows: its number of encoded words and which of its candidates are usable."""

    n_words: int
    region_valid: np.ndarray  # (K,) bool, padded to the layout's K
    max_entities: int


def build_target(entities: Sequence[Entity], layout: Layout) -> list[int]:
    """The symbol sequence of ``entities`` (any order; they must not overlap), ending with EOS. Hierarchical:
    an entity with a region is GROUNDABLE (the region itself is the separate target of its region step)."""
    seq, previous_end = [], -1
    for e in sorted(entities):
        if not 0 <= e.start <= e.end < layout.n_words:
            raise ValueError(f"entity {e} outside the {layout.n_words} encoded words")
        if e.start <= previous_end:
            raise ValueError(f"entity {e} overlaps the one before it; index generation needs flat entities")
        if not 0 <= e.type < layout.n_types:
            raise ValueError(f"entity {e} has no type of the {layout.n_types}")
        if e.region is not None and not 0 <= e.region < layout.n_regions:
            raise ValueError(f"entity {e} points outside the {layout.n_regions} candidates")
        words = [layout.word0 + e.start, layout.word0 + e.end]
        if layout.head == "hierarchical":
            seq += [*words, UNGROUNDABLE if e.region is None else GROUNDABLE, layout.first_type + e.type]
        else:
            region = NO_REGION if e.region is None else layout.region0 + e.region
            seq += [*words, layout.first_type + e.type, region]
        previous_end = e.end
    return seq + [EOS]


def region_steps(seq: Sequence[int], layout: Layout) -> list[int]:
    """Hierarchical: the decoder input positions (of ``[BOS] + seq``) whose state gives the region
    distribution of each groundable entity, in order: those whose input is a GROUNDABLE indicator."""
    if layout.head != "hierarchical":
        return []
    return [i + 1 for i in range(2, len(seq), SYMBOLS_PER_ENTITY) if seq[i] == GROUNDABLE]


def parse_sequence(seq: Sequence[int], layout: Layout, regions: Sequence[int] = ()) -> list[Entity]:
    """Entities of a sequence made by ``build_target`` or the decoders; stops at EOS. Hierarchical:
    ``regions`` holds the chosen candidate of each groundable entity, in order. Sequences the state machine
    would not produce are refused."""
    entities, chosen = [], iter(regions)
    words = range(layout.word0, layout.region0)
    types = range(layout.first_type, layout.word0)
    for i in range(0, len(seq), SYMBOLS_PER_ENTITY):
        if seq[i] == EOS:
            if next(chosen, None) is not None:
                raise ValueError(f"more regions {list(regions)} than groundable entities: {list(seq)}")
            return entities
        group = list(seq[i : i + SYMBOLS_PER_ENTITY])
        if len(group) < SYMBOLS_PER_ENTITY:
            raise ValueError(f"sequence ends inside an entity: {list(seq)}")
        if layout.head == "hierarchical":
            start, end, indicator, etype = group
            if indicator not in (GROUNDABLE, UNGROUNDABLE):
                raise ValueError(f"symbol {indicator} is not an indicator: {list(seq)}")
            region = next(chosen, None) if indicator == GROUNDABLE else None
            if indicator == GROUNDABLE and region is None:
                raise ValueError(f"a groundable entity without a chosen region: {list(seq)}")
        else:
            start, end, etype, symbol = group
            if symbol != NO_REGION and symbol not in range(layout.region0, layout.size):
                raise ValueError(f"symbol {symbol} is not a region: {list(seq)}")
            region = None if symbol == NO_REGION else symbol - layout.region0
        if start not in words or end not in words or etype not in types:
            raise ValueError(f"symbols {group} are not start, end, ..., type: {list(seq)}")
        entities.append(Entity(start - layout.word0, end - layout.word0, etype - layout.first_type, region))
    raise ValueError(f"sequence has no EOS: {list(seq)}")


def allowed(prefix: Sequence[int], layout: Layout, rules: Constraints) -> np.ndarray:
    """(layout.size,) bool: the symbols that may follow ``prefix`` (which holds no EOS).

    Starts come after the previous entity's end, ends at or after their start; then a type and NO_REGION or
    a usable candidate (flat), or an indicator and a type (hierarchical; GROUNDABLE only when the tweet has
    a usable candidate); EOS only between entities; no further start once ``max_entities`` are complete.
    """
    mask = np.zeros(layout.size, dtype=bool)
    phase, done = len(prefix) % SYMBOLS_PER_ENTITY, len(prefix) // SYMBOLS_PER_ENTITY
    types = slice(layout.first_type, layout.word0)
    if phase == 0:
        mask[EOS] = True
        if done < rules.max_entities:
            first = prefix[-3] - layout.word0 + 1 if prefix else 0  # after the previous end
            mask[layout.word0 + first : layout.word0 + rules.n_words] = True
    elif phase == 1:
        mask[prefix[-1] : layout.word0 + rules.n_words] = True
    elif layout.head == "hierarchical":
        if phase == 2:
            mask[UNGROUNDABLE] = True
            mask[GROUNDABLE] = bool(rules.region_valid[: layout.n_regions].any())
        else:
            mask[types] = True
    elif phase == 2:
        mask[types] = True
    else:
        mask[NO_REGION] = True
        mask[layout.region0 : layout.size] = rules.region_valid[: layout.n_regions]
    return mask


def max_steps(max_entities: int) -> int:
    return SYMBOLS_PER_ENTITY * max_entities + 1


# step(tweets, prefixes) -> (len(prefixes), layout.size) logits of the next symbol of each prefix, where
# tweets[i] is the batch row prefix i belongs to.
StepFn = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]


def _log_probs(step: StepFn, tweets: list[int], prefixes: list[list[int]], layout: Layout,
               rules: Sequence[Constraints]) -> torch.Tensor:
    """Next-symbol log-probabilities with every disallowed symbol at -inf (at least EOS or NO_REGION is allowed)."""
    logits = step(torch.tensor(tweets, dtype=torch.long), prefixes).float()
    mask = torch.from_numpy(np.stack([allowed(p, layout, rules[b]) for b, p in zip(tweets, prefixes)]))
    return torch.log_softmax(logits.masked_fill(~mask.to(logits.device), float("-inf")), dim=-1).cpu()


def greedy_decode(step: StepFn, layout: Layout, rules: Sequence[Constraints]) -> list[list[int]]:
    """The most probable allowed symbol at each step, per tweet, until EOS."""
    seqs: list[list[int]] = [[] for _ in rules]
    for _ in range(max_steps(max(r.max_entities for r in rules))):
        live = [b for b, s in enumerate(seqs) if not s or s[-1] != EOS]
        if not live:
            break
        choices = _log_probs(step, live, [seqs[b] for b in live], layout, rules).argmax(dim=-1)
        for b, symbol in zip(live, choices.tolist()):
            seqs[b].append(symbol)
    return seqs


def beam_decode(step: StepFn, layout: Layout, rules: Sequence[Constraints], beam_size: int) -> list[list[int]]:
    """Beam search per tweet over allowed symbols; the finished hypothesis of highest summed log-probability.

    Ties go to the earlier hypothesis and the lower symbol (stable sorts), as ``argmax`` does in greedy.
    """
    if beam_size < 1:
        raise ValueError(f"beam size must be at least 1, got {beam_size}")
    beams: list[list[tuple[float, list[int]]]] = [[(0.0, [])] for _ in rules]
    for _ in range(max_steps(max(r.max_entities for r in rules))):
        live = [(b, h) for b, hyps in enumerate(beams) for h, (_, s) in enumerate(hyps) if not s or s[-1] != EOS]
        if not live:
            break
        log_probs = _log_probs(step, [b for b, _ in live], [beams[b][h][1] for b, h in live], layout, rules)
        top = torch.sort(log_probs, dim=-1, descending=True, stable=True)
        pools: list[list[tuple[float, list[int]]]] = [[hyp for hyp in hyps if hyp[1] and hyp[1][-1] == EOS]
                                                      for hyps in beams]
        for row, (b, h) in enumerate(live):
            score, seq = beams[b][h]
            for value, symbol in zip(top.values[row, :beam_size].tolist(), top.indices[row, :beam_size].tolist()):
                if value != float("-inf"):
                    pools[b].append((score + value, seq + [symbol]))
        beams = [sorted(pool, key=lambda hyp: -hyp[0])[:beam_size] for pool in pools]  # sorted() is stable
    return [max(hyps, key=lambda hyp: hyp[0])[1] for hyps in beams]
