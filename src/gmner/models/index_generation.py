"""The H-Index-style index-generation model: a BART encoder-decoder that writes each entity as pointers.

Encoder input, per tweet: its subword embeddings (with ``captions``, the image's caption after the tweet),
then the projected whole-image feature, the feature of the image generated from the tweet, then its top-K
detector candidates (standardised embedding + box geometry + rank, see gmner.models.visual_store). Each tweet's visual
slots follow its OWN text, so their learned positions do not depend on how the batch is padded; the image
slots precede the candidates for the same reason. The attention mask is 0 for padding and for every missing
input (no image, null features, padded candidates, switched-off inputs): nothing absent is read as a zero
vector.

Decoder output per entity (see gmner.models.pointer_decoding): start word, end word, type, then NONE or a candidate;
then EOS. Word pointers score the decoder state against the encoder state of each word's first subword,
region pointers against the candidates' encoder states, and EOS / NONE / types come from a small vocabulary.
A pointer symbol fed back to the decoder is embedded as the encoder state it points at. The region is read
at the step that follows the type, in training and in decoding alike, and trained with KL to the IoU soft
labels (or cross-entropy on their best option), the rest with cross-entropy, all under the decoding
constraints.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.models.grounded_tagger import GroundedModel
from gmner.models.losses import grounding_loss
from gmner.models.pointer_decoding import (
    BOS,
    EOS,
    FIRST_TYPE,
    NO_REGION,
    SYMBOLS_PER_ENTITY,
    Constraints,
    Entity,
    Layout,
    allowed,
    beam_decode,
    build_target,
    greedy_decode,
    max_steps,
    parse_sequence,
)
from gmner.models.tagger import CRFTagger, EncodedTweet, WordTagger, length_batches, predicting
from gmner.models.text_encoder import DEFAULT_TINY_VOCAB, TINY, build_wordpiece_tokenizer, load_text_encoder
from gmner.models.visual_model import VisualPredictor, load_visual_predictor
from gmner.models.visual_projection import VisualProjection
from gmner.models.visual_store import NONE, ImageVisual, switched_extras


@dataclass(frozen=True)
class IndexConfig:
    visual_dim: int  # size of the region and image embeddings
    top_k: int = 16  # candidates per image, best first
    regions: bool = True  # False: candidates are masked, so every entity gets NONE
    global_feature: bool = True  # False: the whole-image slot is masked
    region_loss: str = "kl"  # kl: to IoU soft labels; ce: cross-entropy on the best option
    soft_label_threshold: float = 0.5  # candidates with IoU <= this get no target mass
    region_weight: float = 1.0  # of the region-pointer loss beside the sequence loss
    max_entities: int = 10  # per tweet, in training targets and decoding
    beam_size: int = 1  # 1: greedy decoding
    captions: bool = False  # the image's caption is appended to the text input
    generated_image: bool = False  # the image generated from the tweet has an encoder slot

    @property
    def extras(self) -> tuple[str, ...]:
        return switched_extras(captions=self.captions, generated=self.generated_image)

    def __post_init__(self):
        if self.region_loss not in ("kl", "ce"):
            raise ValueError(f"region loss must be 'kl' or 'ce', got {self.region_loss!r}")
        if self.beam_size < 1 or self.max_entities < 1 or self.top_k < 1:
            raise ValueError(f"beam_size, max_entities and top_k must be at least 1: {self}")


def build_bart(spec: str, tiny: dict, vocab_words=None, dropout: float = 0.1):
    """``(BartModel, fast tokenizer)``: random weights from the BartConfig fields in ``tiny`` with a WordPiece
    vocabulary of ``vocab_words`` (as the tagger's tiny encoder), or a hub id / local folder."""
    from transformers import BartConfig, BartModel

    if spec != TINY:
        model, tokenizer = load_text_encoder(spec, {})
        if not isinstance(model, BartModel):
            raise ValueError(f"index generation needs a BART model, {spec!r} is a {type(model).__name__}")
        return model, tokenizer
    if vocab_words is None:
        raise ValueError("the tiny BART builds its vocabulary from the training words; pass vocab_words")
    config = dict(tiny)
    tokenizer = build_wordpiece_tokenizer(vocab_words, config.pop("vocab_size", DEFAULT_TINY_VOCAB))
    bart = BartConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.cls_token_id,
        forced_eos_token_id=None, dropout=dropout, **config,
    )
    return BartModel(bart), tokenizer


class IndexGenerator(GroundedModel, WordTagger):
    """BART with visual encoder slots and pointer outputs. ``self.encoder`` is the whole BartModel, so that
    ``fit`` trains all of it at the encoder learning rate and everything added here at ``head_lr``."""

    kind = "index_generation"
    visual_config = IndexConfig

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,
        labels: Sequence[str],
        max_length: int = 128,
        dropout: float = 0.1,
        *,
        visual: IndexConfig,
        visual_paths: dict | None = None,
    ):
        WordTagger.__init__(self, encoder, tokenizer, labels, max_length)  # not VisualModel's: no CRF here
        limit = encoder.config.max_position_embeddings
        if max_length + 2 + visual.top_k > limit:
            raise ValueError(f"max_length {max_length} + 2 + top_k {visual.top_k} exceeds {limit} positions")
        steps = max_steps(visual.max_entities)
        if steps > limit:
            raise ValueError(f"max_entities {visual.max_entities} needs {steps} decoder steps; {limit} positions")
        self.dropout_p = dropout
        self.init_visual(visual, visual_paths)
        d = encoder.config.d_model
        self.visual_projection = VisualProjection(visual.visual_dim, visual.top_k, d)
        self.n_vocab = FIRST_TYPE + len(self.types)  # EOS, NONE, types
        self.symbol = nn.Embedding(self.n_vocab + 1, d)  # + BOS, an input only
        self.vocab = nn.Linear(d, self.n_vocab)
        self.word_key = nn.Linear(d, d)
        self.region_key = nn.Linear(d, d)

    save = CRFTagger.save  # model.json + encoder/ + head.safetensors, as the taggers
    load = classmethod(CRFTagger.load.__func__)

    # --- batches -------------------------------------------------------------------------------------------

    def encoder_inputs(self, batch: dict) -> dict:
        """``embeds`` (B, T, d) and ``mask`` (B, T) of the encoder, with ``region_slots`` (B, K): where each
        tweet's candidates sit, after its own text (caption included), its image and its generated image."""
        embed = self.encoder.get_encoder().embed_tokens
        text_mask = batch["attention_mask"].bool()
        n, length = text_mask.shape
        k = batch["region_mask"].shape[1]
        text_len = text_mask.sum(dim=1)
        slots = text_len[:, None] + torch.arange(2 + k, device=self.device)  # image, generated, candidates
        image, generated, regions = self.visual_projection(batch)
        visual_mask = torch.cat([
            (batch["image_mask"] & self.visual_cfg.global_feature)[:, None],
            (batch["generated_mask"] & self.visual_cfg.generated_image)[:, None],
            batch["region_mask"] & self.visual_cfg.regions,
        ], dim=1)
        embeds = torch.zeros((n, length + 2 + k, embed.embedding_dim), device=self.device)
        embeds[:, :length] = embed(batch["input_ids"]) * text_mask[..., None]
        rows = torch.arange(n, device=self.device)[:, None]
        embeds[rows, slots] = torch.cat([image[:, None], generated[:, None], regions], dim=1)
        mask = torch.zeros((n, length + 2 + k), dtype=torch.bool, device=self.device)
        mask[:, :length] = text_mask
        mask[rows, slots] = visual_mask
        return {"embeds": embeds, "mask": mask, "region_slots": slots[:, 2:]}

    def encode_batch(self, batch: dict) -> dict:
        """Encoder states, the word and candidate states pointers score against, and their validity."""
        inputs = self.encoder_inputs(batch)
        memory = self.encoder.get_encoder()(inputs_embeds=inputs["embeds"], attention_mask=inputs["mask"].long())
        memory = memory.last_hidden_state
        rows = torch.arange(len(memory), device=self.device)[:, None]
        words = memory[rows, batch["word_pos"]]
        word_valid = torch.arange(words.shape[1], device=self.device) < batch["n_words"][:, None]
        return {
            "memory": memory,
            "mask": inputs["mask"],
            "words": words,
            "word_valid": word_valid,
            "regions": memory[rows, inputs["region_slots"]],
            "region_valid": batch["region_mask"] & self.visual_cfg.regions,
        }

    def layout(self, states: dict) -> Layout:
        return Layout(len(self.types), states["words"].shape[1], states["regions"].shape[1])

    def constraints(self, states: dict) -> list[Constraints]:
        valid = states["region_valid"].cpu().numpy()
        return [Constraints(int(n), valid[b], self.visual_cfg.max_entities)
                for b, n in enumerate(states["word_valid"].sum(dim=1).tolist())]

    # --- decoder ----------------------------------------------------------------------------------------------

    def symbol_logits(self, states: dict, tweets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(n, t, layout.size) logits of the symbol after each input prefix; ``inputs`` (n, t) start with BOS
        and ``tweets`` (n,) says whose states row i decodes from. Invalid words / candidates are very negative."""
        layout = self.layout(states)
        words, regions = states["words"][tweets], states["regions"][tweets]
        rows = torch.arange(len(tweets), device=self.device)[:, None]
        embeds = self.symbol(torch.where(inputs == BOS, self.n_vocab, inputs.clamp(0, self.n_vocab)))
        is_word = (inputs >= layout.word0) & (inputs < layout.region0)
        pointed = words[rows, (inputs - layout.word0).clamp(0, layout.n_words - 1)]  # W >= 1 (WordTagger.collate)
        embeds = torch.where(is_word[..., None], pointed, embeds)
        if layout.n_regions:
            pointed = regions[rows, (inputs - layout.region0).clamp(0, layout.n_regions - 1)]
            embeds = torch.where((inputs >= layout.region0)[..., None], pointed, embeds)
        hidden = self.encoder.get_decoder()(
            inputs_embeds=embeds,
            encoder_hidden_states=states["memory"][tweets],
            encoder_attention_mask=states["mask"][tweets].long(),
        ).last_hidden_state
        scale = 1 / math.sqrt(hidden.shape[-1])
        word_logits = torch.einsum("ntd,nwd->ntw", hidden, self.word_key(words)) * scale
        region_logits = torch.einsum("ntd,nkd->ntk", hidden, self.region_key(regions)) * scale
        very_negative = torch.finfo(hidden.dtype).min
        word_logits = word_logits.masked_fill(~states["word_valid"][tweets][:, None], very_negative)
        region_logits = region_logits.masked_fill(~states["region_valid"][tweets][:, None], very_negative)
        return torch.cat([self.vocab(hidden), word_logits, region_logits], dim=-1)

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the gold sequences' symbols (teacher forced) under the decoding constraints, plus
        ``region_weight`` x the region-pointer loss (KL to soft labels or CE) at every entity's region step."""
        states = self.encode_batch(batch)
        layout, rules = self.layout(states), self.constraints(states)
        targets = [build_target(entities, layout) for entities in batch["entities"]]
        steps = max(map(len, targets))
        inputs = torch.full((len(targets), steps), EOS, dtype=torch.long)
        gold = torch.full((len(targets), steps), -100, dtype=torch.long)  # -100: ignored (padding)
        allowed_mask = torch.ones((len(targets), steps, layout.size), dtype=torch.bool)
        region_steps, region_targets = [], []
        for b, seq in enumerate(targets):
            inputs[b, : len(seq)] = torch.tensor([BOS] + seq[:-1])
            for i, symbol in enumerate(seq):
                allowed_mask[b, i] = torch.from_numpy(allowed(seq[:i], layout, rules[b]))
                if i % SYMBOLS_PER_ENTITY == SYMBOLS_PER_ENTITY - 1:  # a region step
                    region_steps.append((b, i))
                    padded = np.zeros(1 + layout.n_regions, np.float32)
                    soft = batch["region_targets"][b][i // SYMBOLS_PER_ENTITY]
                    padded[: len(soft)] = soft
                    region_targets.append(padded)
                else:
                    gold[b, i] = symbol
        tweets = torch.arange(len(targets), device=self.device)
        logits = self.symbol_logits(states, tweets, inputs.to(self.device))
        logits = logits.masked_fill(~allowed_mask.to(self.device), torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits.flatten(0, 1), gold.flatten().to(self.device), ignore_index=-100)
        if region_steps:
            b, i = (torch.tensor(x, device=self.device) for x in zip(*region_steps))
            options = torch.cat([logits[b, i, NO_REGION : NO_REGION + 1], logits[b, i, layout.region0 :]], dim=-1)
            target = torch.from_numpy(np.stack(region_targets)).to(self.device)
            loss = loss + self.visual_cfg.region_weight * grounding_loss(options, target, self.visual_cfg.region_loss)
        return loss

    def gold_entities(
        self, encoded: EncodedTweet, spans: Sequence[tuple[int, int, str]], targets: Sequence[np.ndarray],
        counts: Counter,
    ) -> tuple[list[Entity], list[np.ndarray]]:
        """A tweet's gold spans in encoded-word indices with their region targets, ordered by start. The
        region symbol is the target's best option. Spans without encoded words, and those beyond
        ``max_entities``, are left out and counted."""
        position = {word: j for j, word in enumerate(encoded.word_idx)}
        kept = []
        for (start, end, etype), target in sorted(zip(spans, targets), key=lambda pair: pair[0][:2]):
            inside = [position[w] for w in range(start, end) if w in position]
            if not inside:
                counts["spans_without_words"] += 1
                continue
            best = int(np.argmax(target))
            region = None if best == NONE else best - 1
            kept.append((Entity(inside[0], inside[-1], self.type_index[etype], region), target))
        counts["spans_beyond_max_entities"] += max(0, len(kept) - self.visual_cfg.max_entities)
        kept = kept[: self.visual_cfg.max_entities]
        return [e for e, _ in kept], [t for _, t in kept]

    # --- prediction ---------------------------------------------------------------------------------------

    @predicting
    def generate(self, batch: dict) -> tuple[list[list[Entity]], Layout]:
        """Constrained decoding (greedy, or beam search when ``beam_size`` > 1) of a collated batch."""
        states = self.encode_batch(batch)
        layout, rules = self.layout(states), self.constraints(states)

        def step(tweets: torch.Tensor, prefixes: list[list[int]]) -> torch.Tensor:
            inputs = torch.tensor([[BOS] + p for p in prefixes], dtype=torch.long, device=self.device)
            return self.symbol_logits(states, tweets.to(self.device), inputs)[:, -1]

        if self.visual_cfg.beam_size == 1:
            seqs = greedy_decode(step, layout, rules)
        else:
            seqs = beam_decode(step, layout, rules, self.visual_cfg.beam_size)
        return [parse_sequence(seq, layout) for seq in seqs], layout

    @torch.no_grad()
    def predict_entities(
        self, token_lists: Sequence[Sequence[str]], visuals: Sequence[ImageVisual], batch_size: int = 64
    ) -> list[list[dict]]:
        """Per tweet, schema.PREDICTED_ENTITY dicts with the chosen candidate (``region``, ``box``) or none."""
        encoded, _ = self.encode(token_lists, self.contexts(visuals))
        out: list[list[dict]] = [[] for _ in encoded]
        for chunk in length_batches(encoded, batch_size):
            entities, _ = self.generate(self.collate_inputs([encoded[i] for i in chunk], [visuals[i] for i in chunk]))
            for i, tweet_entities in zip(chunk, entities):
                words = encoded[i].word_idx
                for e in tweet_entities:
                    box = None if e.region is None else visuals[i].boxes[e.region].tolist()
                    out[i].append({"start": words[e.start], "end": words[e.end] + 1, "type": self.types[e.type],
                                   "region": e.region, "box": box})
        return out


def load_predictor(model_dir, device: torch.device) -> VisualPredictor:
    return load_visual_predictor(IndexGenerator, model_dir, device)
