"""Text encoders (a transformer body plus its fast tokenizer) from a hub id, a local folder, or a tiny config.

``"tiny"`` builds a random-weight BERT from ``train.tiny`` and a WordPiece tokenizer whose vocabulary comes
from the training words, so tests and the embedded sample run offline. Its vocabulary is built here rather
than with ``tokenizers``' WordPieceTrainer because that trainer breaks ties in hash-map order: two runs
can give different token ids, and with them different random embeddings for the same seed.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from gmner.core.model_refs import TINY, check_tokenizer, load_from_folder, resolve_model

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_TINY_VOCAB = 8000


def load_text_encoder(spec: str, tiny: dict, vocab_words: Iterable[str] | None = None):
    """Return ``(encoder, tokenizer)``: an ``nn.Module`` giving ``last_hidden_state`` and a fast tokenizer.

    ``spec`` is ``"tiny"`` (random weights from the BertConfig fields in ``tiny``; needs ``vocab_words``;
    an optional ``tiny["vocab_size"]`` caps the vocabulary), a hub id, or a local folder.
    """
    if spec == TINY:
        if vocab_words is None:
            raise ValueError("the tiny text encoder builds its vocabulary from the training words; pass vocab_words")
        return _tiny_encoder(tiny, vocab_words)
    return _pretrained_encoder(spec)


def _pretrained_encoder(spec: str):
    from transformers import AutoModel, AutoTokenizer

    where = "text encoder"
    ref = resolve_model(spec, where)
    tokenizer = load_from_folder(where, ref, AutoTokenizer.from_pretrained)
    check_tokenizer(where, ref.folder, tokenizer, minimum=len(SPECIAL_TOKENS) + 1)
    encoder = load_from_folder(where, ref, AutoModel.from_pretrained)
    if not tokenizer.is_fast:
        raise ValueError(f"text encoder {spec!r} has no fast tokenizer; word alignment needs word_ids()")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"text encoder {spec!r} has no padding token")
    return encoder, tokenizer


def _tiny_encoder(tiny: dict, vocab_words: Iterable[str]):
    from transformers import BertConfig, BertModel

    config = dict(tiny)
    tokenizer = build_wordpiece_tokenizer(vocab_words, config.pop("vocab_size", DEFAULT_TINY_VOCAB))
    bert = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config)
    return BertModel(bert), tokenizer  # with the (unused) pooler, as AutoModel reloads it


def build_wordpiece_tokenizer(words: Iterable[str], vocab_size: int = DEFAULT_TINY_VOCAB):
    """A cased BERT-style WordPiece tokenizer over ``words``, deterministic for the same word multiset.

    The vocabulary holds the special tokens, every character seen (word-initial and ``##`` forms, so any
    word made of seen characters has subwords), then whole words seen at least twice, most frequent first,
    up to ``vocab_size``. Words seen once are left to split: the model then meets subword pieces in training
    and can handle unseen words at test time.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    counts = Counter(piece for word in words for piece in normalizer.normalize_str(word).split())
    chars = sorted({c for piece in counts for c in piece})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    frequent = sorted((w for w, n in counts.items() if n >= 2 and len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += frequent[: max(0, vocab_size - len(vocab))]

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
