"""Word-level BIO taggers over a transformer encoder; ``CRFTagger`` is the BERT-CRF baseline of the GMNER papers.

Word alignment: each word is represented by its FIRST subword (the usual BERT NER setup); later subwords
are context only. The tag sequence, and the CRF over it, run over words, never subwords. Two kinds of word
have no first subword in the encoded input and are predicted ``"O"``: words cut off by ``max_length``
(counted and warned about, see ``Alignment``) and words the tokenizer maps to nothing (e.g. only control
characters). The CRF runs over the words that do have one, in order, so its mask stays a contiguous prefix.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import get_worker_info
from torchcrf import CRF

from gmner.core.bio import split_tag
from gmner.models.text_encoder import load_text_encoder

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
HEAD_FILE = "head.safetensors"
ENCODER_DIR = "encoder"


def build_labels(tag_sequences: Iterable[Sequence[str]]) -> list[str]:
    """``O`` then ``B-T, I-T`` for every entity type T seen in the tags, types sorted (read from data)."""
    types = set()
    for tags in tag_sequences:
        for tag in tags:
            types.add(split_tag(tag)[1])
    types.discard(None)
    return ["O"] + [f"{p}-{t}" for t in sorted(types) for p in ("B", "I")]


@dataclass(frozen=True)
class EncodedTweet:
    input_ids: list[int]
    word_pos: list[int]  # subword position of the first subword of each encoded word
    word_idx: list[int]  # which word of the tweet each encoded word is (increasing)
    n_words: int
    text_len: int = -1  # subwords of the tweet part (specials included); the rest is appended context

    @property
    def tweet_len(self) -> int:
        return len(self.input_ids) if self.text_len < 0 else self.text_len


@dataclass
class Alignment:
    """Words left without a first subword, by cause; they are predicted ``"O"``."""

    truncated_words: int = 0  # beyond max_length subwords
    empty_words: int = 0  # the tokenizer gives them no subword at all

    def as_dict(self) -> dict:
        return {"truncated_words": self.truncated_words, "empty_words": self.empty_words}


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode without gradients inside; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def predicting(method: Callable) -> Callable:
    """A model method run under :func:`evaluating`."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with evaluating(self):
            return method(self, *args, **kwargs)

    return run


def length_batches(encoded: Sequence[EncodedTweet], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``encoded`` in batches of similar subword length (less padding), for prediction."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class WordTagger(nn.Module):
    """Shared word alignment, batching and prediction; subclasses define ``loss`` and ``decode`` on a batch."""

    def __init__(self, encoder: nn.Module, tokenizer, labels: Sequence[str], max_length: int):
        super().__init__()
        limit = getattr(encoder.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the encoder's {limit} positions")
        if labels[0] != "O":
            raise ValueError(f"label 0 must be 'O' (padding and unaligned words), got {labels[0]!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.label_index = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def collate_device(self) -> torch.device:
        """Where ``collate`` puts batches: the model's device, except in a DataLoader worker process, which must
        not touch CUDA (the training loop moves those batches to the device, from pinned memory)."""
        return torch.device("cpu") if get_worker_info() is not None else self.device

    @property
    def pretrained(self) -> list[nn.Module]:
        """The modules that start from pre-trained weights: they train at the encoder learning rate."""
        return [self.encoder]

    @property
    def parts(self) -> tuple[str, ...]:
        """The submodules a model folder holds as pretrained folders of their own (save_with_encoder)."""
        return (ENCODER_DIR,)

    def encode(
        self, token_lists: Sequence[Sequence[str]], contexts: Sequence[Sequence[str] | None] | None = None
    ) -> tuple[list[EncodedTweet], Alignment]:
        """Tokenize whole tweets once; record each word's first subword and count the words that have none.

        ``contexts`` (e.g. image captions, one word list or None per tweet) are appended after the tweet as
        ``context [SEP]`` in what room ``max_length`` leaves: they are read by the encoder, never tagged.
        """
        enc = self.tokenizer(
            [list(tokens) for tokens in token_lists],
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
        )
        out, stats = [], Alignment()
        for i, tokens in enumerate(token_lists):
            word_pos, word_idx = [], []
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and (not word_idx or word_idx[-1] != word):
                    word_pos.append(pos)
                    word_idx.append(word)
            # Truncation moves subwords into ``overflowing``; a word found only there was cut off.
            cut = {w for part in enc.encodings[i].overflowing for w in part.word_ids if w is not None}
            truncated = len(cut - set(word_idx))
            stats.truncated_words += truncated
            stats.empty_words += len(tokens) - len(word_idx) - truncated
            out.append(EncodedTweet(enc["input_ids"][i], word_pos, word_idx, len(tokens)))
        if contexts is not None:
            out = [self._append_context(e, context) for e, context in zip(out, contexts)]
        if stats.truncated_words:
            log.warning("%d words beyond max_length=%d subwords get 'O'", stats.truncated_words, self.max_length)
        return out, stats

    def _append_context(self, encoded: EncodedTweet, context: Sequence[str] | None) -> EncodedTweet:
        room = self.max_length - len(encoded.input_ids) - 1
        if not context or room < 1:
            return encoded
        ids = self.tokenizer(list(context), is_split_into_words=True, add_special_tokens=False)["input_ids"][:room]
        if not ids:
            return encoded
        return replace(
            encoded, input_ids=encoded.input_ids + ids + [self.tokenizer.sep_token_id],
            text_len=len(encoded.input_ids),
        )

    def label_ids(self, tags: Sequence[str]) -> list[int]:
        return [self.label_index[tag] for tag in tags]

    def collate(self, encoded: Sequence[EncodedTweet], label_ids: Sequence[Sequence[int]] | None = None) -> dict:
        """Pad a batch. Word tensors cover encoded words only; a tweet with none keeps one dummy ``O`` step
        on [CLS] because the CRF needs every sequence to start unmasked. ``context_mask`` marks appended context."""
        n, seq_len = len(encoded), max(len(e.input_ids) for e in encoded)
        n_words = max(1, max(len(e.word_pos) for e in encoded))
        input_ids = torch.full((n, seq_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
        context_mask = torch.zeros((n, seq_len), dtype=torch.bool)
        word_pos = torch.zeros((n, n_words), dtype=torch.long)
        word_mask = torch.zeros((n, n_words), dtype=torch.bool)
        labels = torch.zeros((n, n_words), dtype=torch.long)
        for b, e in enumerate(encoded):
            input_ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attention_mask[b, : len(e.input_ids)] = 1
            context_mask[b, e.tweet_len : len(e.input_ids)] = True
            word_pos[b, : len(e.word_pos)] = torch.tensor(e.word_pos, dtype=torch.long)
            word_mask[b, : max(1, len(e.word_pos))] = True
            if label_ids is not None and e.word_idx:
                labels[b, : len(e.word_idx)] = torch.tensor([label_ids[b][w] for w in e.word_idx])
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "context_mask": context_mask,
            "word_pos": word_pos, "word_mask": word_mask,
        }
        if label_ids is not None:
            batch["labels"] = labels
        return {k: v.to(self.collate_device) for k, v in batch.items()}

    def word_states(self, batch: dict) -> torch.Tensor:
        """Encoder states of each word's first subword: (batch, words, hidden)."""
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        rows = torch.arange(hidden.size(0), device=hidden.device)[:, None]
        return hidden[rows, batch["word_pos"]]

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, batch: dict) -> list[list[int]]:
        """Label ids per encoded word (a dummy step for tweets without any is dropped by the caller)."""
        raise NotImplementedError

    @predicting
    def predict_tags(self, token_lists: Sequence[Sequence[str]], batch_size: int = 64) -> list[list[str]]:
        """BIO tags per word, in input order; words without a first subword get ``"O"``."""
        encoded, _ = self.encode(token_lists)
        tags: list[list[str]] = [[] for _ in encoded]
        for chunk in length_batches(encoded, batch_size):
            decoded = self.decode(self.collate([encoded[i] for i in chunk]))
            for i, ids in zip(chunk, decoded):
                tags[i] = self.word_tags(encoded[i], ids)
        return tags

    def word_tags(self, encoded: EncodedTweet, ids: Sequence[int]) -> list[str]:
        """Decoded label ids of the encoded words -> one BIO tag per word of the tweet (``"O"`` if unencoded)."""
        tags = ["O"] * encoded.n_words
        for w, label in zip(encoded.word_idx, ids):
            tags[w] = self.labels[label]
        return tags


class CRFTagger(WordTagger):
    """Encoder -> dropout -> linear emissions per word -> linear-chain CRF over word-level BIO labels."""

    kind = "crf_tagger"

    def __init__(
        self, encoder: nn.Module, tokenizer, labels: Sequence[str], max_length: int = 128, dropout: float = 0.1
    ):
        super().__init__(encoder, tokenizer, labels, max_length)
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, len(self.labels))
        self.crf = CRF(len(self.labels), batch_first=True)

    # ``states``: the batch's word_states when a subclass already computed them for another head.
    def emissions(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.word_states(batch) if states is None else states))

    def loss(self, batch: dict, states: torch.Tensor | None = None) -> torch.Tensor:
        """Negative CRF log-likelihood, summed over a tweet's words, averaged over the batch."""
        return -self.crf(self.emissions(batch, states), batch["labels"], mask=batch["word_mask"], reduction="mean")

    def decode(self, batch: dict, states: torch.Tensor | None = None) -> list[list[int]]:
        return self.crf.decode(self.emissions(batch, states), mask=batch["word_mask"])

    def save(self, model_dir: str | Path) -> None:
        """Write ``model.json`` (kind, labels, config), the encoder and tokenizer (and any other pretrained
        part, ``parts``), and the head weights."""
        save_with_encoder(self, model_dir, HEAD_FILE, MODEL_FILE, self.config(), self.parts)

    def config(self) -> dict:
        """What ``model.json`` holds: the kind and the constructor arguments besides encoder and tokenizer."""
        return {"kind": self.kind, "labels": self.labels, "max_length": self.max_length, "dropout": self.dropout_p}

    @classmethod
    def from_config(cls, encoder: nn.Module, tokenizer, config: dict, **parts) -> "CRFTagger":
        return cls(encoder, tokenizer, config["labels"], config["max_length"], config["dropout"], **parts)

    @classmethod
    def load_parts(cls, model_dir: Path, config: dict) -> dict:
        """The pretrained parts besides the encoder, loaded from their folders, as constructor arguments."""
        return {}

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "CRFTagger":
        model_dir = Path(model_dir)
        config = json.loads((model_dir / MODEL_FILE).read_text())
        if config.get("kind") != cls.kind:
            raise ValueError(f"{model_dir / MODEL_FILE}: kind {config.get('kind')!r} is not {cls.kind!r}")
        encoder, tokenizer = load_text_encoder(str(model_dir / ENCODER_DIR), tiny={})
        tagger = cls.from_config(encoder, tokenizer, config, **cls.load_parts(model_dir, config))
        load_non_encoder_weights(tagger, model_dir / HEAD_FILE, tagger.parts)
        return tagger.to(device).eval()


def save_with_encoder(model: WordTagger, model_dir: str | Path, weights_file: str, config_file: str, config: dict,
                      parts: Sequence[str] = (ENCODER_DIR,)):
    """A model folder: the encoder and tokenizer under encoder/ (and any other pretrained submodule named in
    ``parts`` under its own name), every other weight in ``weights_file`` (safetensors) and ``config`` in
    ``config_file`` (JSON)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for part in parts:  # each with the tokenizer, so that every folder loads as a model of its own
        getattr(model, part).save_pretrained(model_dir / part)
        model.tokenizer.save_pretrained(model_dir / part)
    prefixes = tuple(f"{part}." for part in parts)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    save_file(weights, model_dir / weights_file)
    (model_dir / config_file).write_text(json.dumps(config, indent=2) + "\n")


def load_non_encoder_weights(model: nn.Module, path: Path, parts: Sequence[str] = (ENCODER_DIR,)) -> None:
    """Load what ``save_with_encoder`` wrote to ``path``; every weight outside ``parts`` must be there,
    nothing else."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    prefixes = tuple(f"{part}." for part in parts)
    missing = [k for k in missing if not k.startswith(prefixes)]  # the parts load from their own folders
    if missing or unexpected:
        raise ValueError(f"{path}: weights missing {missing}, unexpected {unexpected}")
