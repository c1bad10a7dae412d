"""The index-generation model (H-Index; with ``aligned`` inputs, H-Index + DLRAM): a BART encoder-decoder
that writes each entity as pointers.

Encoder input, per tweet: its text, then the whole-image feature, the feature of the image generated from
the tweet, then its top-K detector candidates (standardised embedding + box geometry + rank, see
gmner.models.visual_projection). The text is BART's own token embeddings (H-Index), or, initialised from a
DLRAM pre-training checkpoint (``IndexConfig.aligned``), the pre-trained text encoder's states, and the
image and candidates go through the pre-trained image and object maps: DLRAM's [T; V; O] (its Eq. 6). Each
tweet's visual slots follow its OWN text, so their learned positions do not depend on how the batch is
padded. The attention mask is 0 for padding and for every missing input (no image, null features, padded
candidates, switched-off inputs): nothing absent is read as a zero vector.

Decoder output per entity (gmner.models.pointer_decoding), with ``head``:

- ``hierarchical`` (default; H-Index / DLRAM Eqs. 7-13): start word, end word, GROUNDABLE / UNGROUNDABLE,
  type; then EOS. Scores are dot products (scaled by 1 / sqrt(d)) of the decoder state with the indicator /
  type / EOS embeddings C (which also embed those symbols as decoder inputs, Eq. 9) and with the word keys
  (T + MLP(H_T)) / 2 (Eq. 8). The region distribution over the K candidates only, keys (V + MLP(H_V)) / 2
  (Eqs. 11, 12), is read from the decoder state whose input is a GROUNDABLE indicator; it is trained by KL
  to the IoU soft labels (or cross-entropy on their best candidate) over the groundable entities a candidate
  covers only (Eq. 13) beside the sequence cross-entropy (Eq. 10): Eq. 14. As in the public H-Index code, an
  entity with a gold box that no candidate covers is trained as UNGROUNDABLE (nothing could be pointed at).
  A pointed word is fed back to the decoder as its text input embedding.
- ``flat``: start word, end word, type, then NONE or a candidate, one joint softmax; scaled dot products
  with plain projections of the encoder states; a pointer fed back is embedded as the encoder state it
  points at; the region option (NONE included) trained with KL / CE at every entity's region step.

Both decode under the pointer_decoding constraints, greedily or by beam search.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gmner.models.grounded_tagger import GroundedModel
from gmner.models.losses import grounding_loss
from gmner.models.pointer_decoding import (
    BOS,
    EOS,
    GROUNDABLE,
    HEADS,
    NO_REGION,
    SYMBOLS_PER_ENTITY,
    UNGROUNDABLE,
    Constraints,
    Entity,
    Layout,
    allowed,
    beam_decode,
    build_target,
    greedy_decode,
    max_steps,
    parse_sequence,
    region_steps,
)
from gmner.models.tagger import (
    ENCODER_DIR,
    CRFTagger,
    EncodedTweet,
    WordTagger,
    length_batches,
    predicting,
)
from gmner.models.text_encoder import DEFAULT_TINY_VOCAB, TINY, build_wordpiece_tokenizer, load_text_encoder
from gmner.models.visual_model import VisualPredictor, load_visual_predictor
from gmner.models.visual_projection import AlignedProjection, VisualProjection
from gmner.models.visual_store import NONE, ImageVisual, switched_extras

TEXT_ENCODER_DIR = "text_encoder"  # the pre-trained text encoder of an aligned model, beside encoder/ (BART)
TYPE_NAMES = {"PER": "person", "LOC": "location", "ORG": "organization", "OTHER": "others", "MISC": "miscellaneous"}


@dataclass(frozen=True)
class IndexConfig:
    visual_dim: int  # size of the region and image embeddings
    top_k: int = 16  # candidates per image, best first
    head: str = "hierarchical"  # hierarchical (H-Index: indicator, then type; regions apart) or flat
    regions: bool = True  # False: candidates are masked, so every entity gets none
    global_feature: bool = True  # False: the whole-image slot is masked
    region_loss: str = "kl"  # kl: to IoU soft labels; ce: cross-entropy on the best option
    soft_label_threshold: float = 0.5  # candidates with IoU <= this get no target mass
    region_weight: float = 1.0  # of the region-pointer loss beside the sequence loss
    max_entities: int = 10  # per tweet, in training targets and decoding
    beam_size: int = 1  # 1: greedy decoding
    captions: bool = False  # the image's caption is appended to the text input
    generated_image: bool = False  # the image generated from the tweet has an encoder slot
    # Shapes of the DLRAM pre-training the inputs start from (AlignedProjection.shape_of); None: H-Index's own.
    aligned: dict | None = None

    @property
    def extras(self) -> tuple[str, ...]:
        return switched_extras(captions=self.captions, generated=self.generated_image)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.region_loss not in ("kl", "ce"):
            raise ValueError(f"region loss must be 'kl' or 'ce', got {self.region_loss!r}")
        if self.beam_size < 1 or self.max_entities < 1 or self.top_k < 1:
            raise ValueError(f"beam_size, max_entities and top_k must be at least 1: {self}")


class DecoderLogits(NamedTuple):
    symbols: torch.Tensor  # (n, t, layout.size): next-symbol logits after each input prefix
    regions: torch.Tensor | None  # hierarchical: (n, t, K) candidate logits at each position; flat: None


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
    """BART with visual encoder slots and pointer outputs. ``self.encoder`` is the whole BartModel; it and an
    aligned model's pre-trained ``text_encoder`` train at the encoder learning rate (``pretrained``),
    everything added here at ``head_lr``."""

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
        text_encoder: nn.Module | None = None,
    ):
        WordTagger.__init__(self, encoder, tokenizer, labels, max_length)  # not VisualModel's: no CRF here
        limit = encoder.config.max_position_embeddings
        if max_length + 2 + visual.top_k > limit:
            raise ValueError(f"max_length {max_length} + 2 + top_k {visual.top_k} exceeds {limit} positions")
        steps = max_steps(visual.max_entities)
        if steps > limit:
            raise ValueError(f"max_entities {visual.max_entities} needs {steps} decoder steps; {limit} positions")
        if (text_encoder is None) != (visual.aligned is None):
            raise ValueError("an aligned index model needs its pre-trained text encoder, and only it has one")
        text_limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", max_length)
        if max_length > text_limit:
            raise ValueError(f"max_length {max_length} exceeds the pre-trained text encoder's {text_limit} positions")
        self.dropout_p = dropout
        self.init_visual(visual, visual_paths)
        d = encoder.config.d_model
        if visual.aligned is None:
            self.visual_projection = VisualProjection(visual.visual_dim, visual.top_k, d)
        else:
            self.visual_projection = AlignedProjection(visual.visual_dim, visual.top_k, d, **visual.aligned)
        self.text_encoder = text_encoder
        self.n_vocab = Layout(len(self.types), 0, 0, visual.head).word0  # EOS, indicators or NONE, types
        self.symbol = nn.Embedding(self.n_vocab + 1, d)  # + BOS, an input only
        if visual.head == "hierarchical":  # C of Eq. 9 are the symbol embeddings themselves
            self.key_mlp = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d))
        else:
            self.vocab = nn.Linear(d, self.n_vocab)
            self.word_key = nn.Linear(d, d)
            self.region_key = nn.Linear(d, d)

    @property
    def pretrained(self) -> list[nn.Module]:
        return [self.encoder] + ([self.text_encoder] if self.text_encoder is not None else [])

    def init_symbols_from_names(self) -> None:
        """H-Index's start for a pre-trained BART: each indicator / type / EOS / BOS embedding (C) is the mean
        of BART's token embeddings of its name (``which region``, ``no region``, ``person``, ...)."""
        if self.visual_cfg.head != "hierarchical" or self.text_encoder is not None:
            raise ValueError("symbol names index BART's own vocabulary: hierarchical head, init none only")
        layout = Layout(len(self.types), 0, 0, "hierarchical")
        names = {EOS: self.tokenizer.eos_token or self.tokenizer.sep_token, GROUNDABLE: "which region",
                 UNGROUNDABLE: "no region", self.n_vocab: self.tokenizer.bos_token or self.tokenizer.cls_token}
        names.update({layout.first_type + i: TYPE_NAMES.get(t, t.lower()) for i, t in enumerate(self.types)})
        embed = self.encoder.get_encoder().embed_tokens
        with torch.no_grad():
            for symbol, name in names.items():
                ids = self.tokenizer(name, add_special_tokens=False)["input_ids"]
                self.symbol.weight[symbol] = embed(torch.tensor(ids, device=self.device)).mean(dim=0)

    @property
    def parts(self) -> tuple[str, ...]:
        return (ENCODER_DIR,) + ((TEXT_ENCODER_DIR,) if self.text_encoder is not None else ())

    @classmethod
    def load_parts(cls, model_dir: Path, config: dict) -> dict:
        """An aligned model's pre-trained text encoder, from text_encoder/ beside encoder/ (BART)."""
        if config["visual"].get("aligned") is None:
            return {}
        return {"text_encoder": load_text_encoder(str(model_dir / TEXT_ENCODER_DIR), tiny={})[0]}

    def fit_feature_statistics(self, visuals: Sequence[ImageVisual]) -> None:
        """An aligned model keeps the pre-training statistics its image and object maps were trained on."""
        if self.visual_cfg.aligned is None:
            super().fit_feature_statistics(visuals)

    save = CRFTagger.save  # model.json + encoder/ (+ text_encoder/) + head.safetensors, as the taggers
    load = classmethod(CRFTagger.load.__func__)

    # --- batches -------------------------------------------------------------------------------------------

    def text_inputs(self, batch: dict) -> torch.Tensor:
        """(B, L, d) text inputs of the encoder, zero at padding: BART's token embeddings, or the pre-trained
        text encoder's states mapped by the aligned model's adapter (T of DLRAM's Eq. 6)."""
        mask = batch["attention_mask"]
        if self.text_encoder is None:
            embeds = self.encoder.get_encoder().embed_tokens(batch["input_ids"])
        else:
            states = self.text_encoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
            embeds = self.visual_projection.adapter(states)
        return embeds * mask.bool()[..., None]

    def encoder_inputs(self, batch: dict) -> dict:
        """``embeds`` (B, T, d) and ``mask`` (B, T) of the encoder, with ``region_slots`` (B, K): where each
        tweet's candidates sit, after its own text (caption included), its image and its generated image."""
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
        text = self.text_inputs(batch)
        embeds = torch.zeros((n, length + 2 + k, text.shape[-1]), device=self.device)
        embeds[:, :length] = text
        rows = torch.arange(n, device=self.device)[:, None]
        embeds[rows, slots] = torch.cat([image[:, None], generated[:, None], regions], dim=1)
        mask = torch.zeros((n, length + 2 + k), dtype=torch.bool, device=self.device)
        mask[:, :length] = text_mask
        mask[rows, slots] = visual_mask
        return {"embeds": embeds, "mask": mask, "region_slots": slots[:, 2:]}

    def encode_batch(self, batch: dict) -> dict:
        """Encoder states, the word and candidate states pointers score against, and their validity; for the
        hierarchical head also their inputs (T, V) and the pointer keys of Eqs. 8 and 11."""
        inputs = self.encoder_inputs(batch)
        memory = self.encoder.get_encoder()(inputs_embeds=inputs["embeds"], attention_mask=inputs["mask"].long())
        memory = memory.last_hidden_state
        rows = torch.arange(len(memory), device=self.device)[:, None]
        words = memory[rows, batch["word_pos"]]
        word_valid = torch.arange(words.shape[1], device=self.device) < batch["n_words"][:, None]
        states = {
            "memory": memory,
            "mask": inputs["mask"],
            "words": words,
            "word_valid": word_valid,
            "regions": memory[rows, inputs["region_slots"]],
            "region_valid": batch["region_mask"] & self.visual_cfg.regions,
        }
        if self.visual_cfg.head == "hierarchical":
            states["word_inputs"] = inputs["embeds"][rows, batch["word_pos"]]
            # T and V enter the keys normalised as the encoder normalises its inputs, so that their average
            # with the (layer-normalised) encoder states is not ruled by whichever input is larger.
            norm = self.encoder.get_encoder().layernorm_embedding
            region_inputs = norm(inputs["embeds"][rows, inputs["region_slots"]])
            states["word_keys"] = (norm(states["word_inputs"]) + self.key_mlp(words)) / 2
            states["region_keys"] = (region_inputs + self.key_mlp(states["regions"])) / 2
        return states

    def layout(self, states: dict) -> Layout:
        return Layout(len(self.types), states["words"].shape[1], states["regions"].shape[1], self.visual_cfg.head)

    def constraints(self, states: dict) -> list[Constraints]:
        valid = states["region_valid"].cpu().numpy()
        return [Constraints(int(n), valid[b], self.visual_cfg.max_entities)
                for b, n in enumerate(states["word_valid"].sum(dim=1).tolist())]

    # --- decoder ----------------------------------------------------------------------------------------------

    def symbol_logits(self, states: dict, tweets: torch.Tensor, inputs: torch.Tensor) -> DecoderLogits:
        """Logits after each input prefix; ``inputs`` (n, t) start with BOS and ``tweets`` (n,) says whose
        states row i decodes from. Invalid words / candidates are very negative."""
        layout = self.layout(states)
        hierarchical = layout.head == "hierarchical"
        words, regions = states["words"][tweets], states["regions"][tweets]
        rows = torch.arange(len(tweets), device=self.device)[:, None]
        embeds = self.symbol(torch.where(inputs == BOS, self.n_vocab, inputs.clamp(0, self.n_vocab)))
        is_word = (inputs >= layout.word0) & (inputs < layout.region0)
        fed_back = states["word_inputs"][tweets] if hierarchical else words
        pointed = fed_back[rows, (inputs - layout.word0).clamp(0, layout.n_words - 1)]  # W >= 1 (collate)
        embeds = torch.where(is_word[..., None], pointed, embeds)
        if not hierarchical and layout.n_regions:
            pointed = regions[rows, (inputs - layout.region0).clamp(0, layout.n_regions - 1)]
            embeds = torch.where((inputs >= layout.region0)[..., None], pointed, embeds)
        hidden = self.encoder.get_decoder()(
            inputs_embeds=embeds,
            encoder_hidden_states=states["memory"][tweets],
            encoder_attention_mask=states["mask"][tweets].long(),
        ).last_hidden_state
        word_valid, region_valid = states["word_valid"][tweets][:, None], states["region_valid"][tweets][:, None]
        if hierarchical:
            hidden = hidden / math.sqrt(hidden.shape[-1])
            vocab = hidden @ self.symbol.weight[: self.n_vocab].T
            word_logits = torch.einsum("ntd,nwd->ntw", hidden, states["word_keys"][tweets])
            region_logits = torch.einsum("ntd,nkd->ntk", hidden, states["region_keys"][tweets])
            return DecoderLogits(torch.cat([vocab, _invalid_out(word_logits, word_valid)], -1),
                                 _invalid_out(region_logits, region_valid))
        scale = 1 / math.sqrt(hidden.shape[-1])
        word_logits = torch.einsum("ntd,nwd->ntw", hidden, self.word_key(words)) * scale
        region_logits = torch.einsum("ntd,nkd->ntk", hidden, self.region_key(regions)) * scale
        return DecoderLogits(torch.cat([self.vocab(hidden), _invalid_out(word_logits, word_valid),
                                        _invalid_out(region_logits, region_valid)], dim=-1), None)

    def loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy of the gold sequences' symbols (teacher forced) under the decoding constraints, plus
        ``region_weight`` x the region loss (KL to soft labels or CE): for the hierarchical head over the K
        candidates at each groundable entity's region step, for the flat head over none + K at every
        entity's region symbol."""
        states = self.encode_batch(batch)
        layout, rules = self.layout(states), self.constraints(states)
        hierarchical = layout.head == "hierarchical"
        targets = [build_target(entities, layout) for entities in batch["entities"]]
        inputs = _teacher_inputs(targets)
        steps = inputs.shape[1]
        gold = torch.full((len(targets), steps), -100, dtype=torch.long)  # -100: ignored (padding)
        allowed_mask = torch.ones((len(targets), steps, layout.size), dtype=torch.bool)
        region_at, region_targets = [], []
        for b, (seq, entities) in enumerate(zip(targets, batch["entities"])):
            soft = batch["region_targets"][b]
            for i, symbol in enumerate(seq):
                allowed_mask[b, i] = torch.from_numpy(allowed(seq[:i], layout, rules[b]))
                if not hierarchical and i % SYMBOLS_PER_ENTITY == SYMBOLS_PER_ENTITY - 1:  # a region symbol
                    region_at.append((b, i))
                    region_targets.append(_padded(soft[i // SYMBOLS_PER_ENTITY], 1 + layout.n_regions))
                else:
                    gold[b, i] = symbol
            if hierarchical:  # the groundable entities' targets; entities come ordered by start (gold_entities)
                region_at += [(b, step) for step in region_steps(seq, layout)]
                region_targets += [_padded(t[1:], layout.n_regions) for e, t in zip(entities, soft)
                                   if e.region is not None]
        tweets = torch.arange(len(targets), device=self.device)
        out = self.symbol_logits(states, tweets, inputs.to(self.device))
        logits = out.symbols.masked_fill(~allowed_mask.to(self.device), torch.finfo(out.symbols.dtype).min)
        loss = F.cross_entropy(logits.flatten(0, 1), gold.flatten().to(self.device), ignore_index=-100)
        if region_at:
            b, i = (torch.tensor(x, device=self.device) for x in zip(*region_at))
            if hierarchical:
                options = out.regions[b, i]
            else:
                options = torch.cat([logits[b, i, NO_REGION : NO_REGION + 1], logits[b, i, layout.region0 :]], -1)
            target = torch.from_numpy(np.stack(region_targets)).to(self.device)
            loss = loss + self.visual_cfg.region_weight * grounding_loss(options, target, self.visual_cfg.region_loss)
        return loss

    def gold_entities(
        self, encoded: EncodedTweet, spans: Sequence[tuple[int, int, str]], targets: Sequence[np.ndarray],
        counts: Counter,
    ) -> tuple[list[Entity], list[np.ndarray]]:
        """A tweet's gold spans in encoded-word indices with their region targets, ordered by start. The
        region is the target's best option: None (ungroundable, or no candidate covers the gold box) or a
        candidate. Spans without encoded words, and those beyond ``max_entities``, are left out and counted."""
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
        """Constrained decoding (greedy, or beam search when ``beam_size`` > 1) of a collated batch. The
        hierarchical head then reads each groundable entity's candidate, the argmax of its region step."""
        states = self.encode_batch(batch)
        layout, rules = self.layout(states), self.constraints(states)

        def step(tweets: torch.Tensor, prefixes: list[list[int]]) -> torch.Tensor:
            inputs = torch.tensor([[BOS] + p for p in prefixes], dtype=torch.long, device=self.device)
            return self.symbol_logits(states, tweets.to(self.device), inputs).symbols[:, -1]

        if self.visual_cfg.beam_size == 1:
            seqs = greedy_decode(step, layout, rules)
        else:
            seqs = beam_decode(step, layout, rules, self.visual_cfg.beam_size)
        regions: list[list[int]] = [[] for _ in seqs]
        if layout.head == "hierarchical" and any(region_steps(seq, layout) for seq in seqs):
            tweets = torch.arange(len(seqs), device=self.device)
            inputs = _teacher_inputs(seqs).to(self.device)
            chosen = self.symbol_logits(states, tweets, inputs).regions.argmax(dim=-1).cpu()
            regions = [chosen[b, region_steps(seq, layout)].tolist() for b, seq in enumerate(seqs)]
        return [parse_sequence(seq, layout, r) for seq, r in zip(seqs, regions)], layout

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


def _padded(target: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, np.float32)
    out[: len(target)] = target
    return out


def _invalid_out(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``logits`` with the invalid positions at the most negative value of their own dtype (bf16 under autocast)."""
    return logits.masked_fill(~valid, torch.finfo(logits.dtype).min)


def _teacher_inputs(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """(n, max length) decoder inputs of whole sequences: BOS then each sequence but its last symbol, padded
    with EOS, so position i's state predicts symbol i."""
    inputs = torch.full((len(seqs), max(map(len, seqs))), EOS, dtype=torch.long)
    for b, seq in enumerate(seqs):
        inputs[b, : len(seq)] = torch.tensor([BOS, *seq[:-1]])
    return inputs


def load_predictor(model_dir, device: torch.device, store=None) -> VisualPredictor:
    return load_visual_predictor(IndexGenerator, model_dir, device, store)
