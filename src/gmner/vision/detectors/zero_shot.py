"""Open-vocabulary detectors from transformers: OWLv2 / OWL-ViT and Grounding DINO, prompted with text.

Prompts are either the ``labels`` param (the same for every image) or the words of the tweets that show
the image (``prompt: tweet``; the words are then part of the cache key). Both families are driven here
directly rather than through the processors' post-processing, so that padded queries are masked, phrase
labels come from known token spans, and boxes map back to original pixels the same way for both.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from gmner.core.hashing import digest
from gmner.core.model_refs import ModelRef, check_tokenizer, load_from_folder, model_fingerprint, resolve_model
from gmner.vision.detectors.base import DetectorLoad, ImageRecord, RankedPerImage, autocast, select_top_k

WHERE = "detect.zero_shot.model"  # the param named in errors
TINY = {"tiny-owlv2": "owlv2", "tiny-grounding-dino": "grounding-dino"}
# Grounding DINO builds its text masks from BERT's [CLS], [SEP] and "." ids, so prompts must use them.
_BERT_CLS, _BERT_SEP, _BERT_DOT = 101, 102, 1012


class HashTokenizer:
    """Words -> ids by hashing, for tiny random-weight models (no vocabulary file exists offline).

    id 0 is padding (OWL masks a query whose first id is 0); ``reserved`` ids are never produced."""

    def __init__(self, vocab_size: int, reserved: tuple[int, ...] = ()):
        self.vocab_size, self.reserved = vocab_size, set(reserved) | {0}

    def word_ids(self, text: str) -> list[int]:
        ids = []
        for word in text.lower().split():
            wid = 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 1)
            while wid in self.reserved:
                wid = 1 + wid % (self.vocab_size - 1)
            ids.append(wid)
        return ids


class ZeroShotDetector(RankedPerImage):
    def __init__(self, cfg: dict, *, k: int, nms_iou: float, precision: str, device, seed: int, loader: DetectorLoad,
                 hash_memo: Path | None = None):
        self.k, self.nms_iou, self.precision, self.device, self.load = k, nms_iou, precision, device, loader
        self.prompt, self.labels, self.template = cfg["prompt"], list(cfg["labels"]), cfg.get("template", "{}")
        self.max_queries, self.max_text_len = cfg.get("max_queries", 16), cfg.get("max_text_len", 16)
        if self.prompt not in ("labels", "tweet"):
            raise ValueError(f"detect.zero_shot.prompt must be 'labels' or 'tweet', not {self.prompt!r}")
        ref = cfg["model"]
        if ref in TINY:
            self.family = TINY[ref]
            torch.manual_seed(seed)
            self.model, self.image_processor, self.tokenizer = _tiny(self.family, cfg["tiny"])
            model_fp = model_fingerprint(ref, config=cfg["tiny"], seed=seed)
        else:
            resolved = resolve_model(ref, WHERE, revision=cfg.get("revision"), hash_memo=hash_memo)
            self.model, self.image_processor, self.tokenizer = _pretrained(resolved)
            self.family = "grounding-dino" if self.model.config.model_type == "grounding-dino" else "owlv2"
            model_fp = resolved.fingerprint
        self.model = self.model.eval().to(device)
        self.fingerprint = digest(model_fp, "zero_shot", self.prompt, self.labels, self.template, self.max_queries,
                                  self.max_text_len, k, nms_iou, precision, loader.max_side)

    def item(self, image: ImageRecord):
        if self.prompt == "labels":
            return image.sha256, (image.path, self.labels)
        queries = list(image.words[: self.max_queries]) or self.labels
        return digest(image.sha256, queries), (image.path, queries)

    def __call__(self, batch: list) -> list[dict]:
        images = [loaded.image for loaded, _ in batch]
        queries = [[self.template.format(q) for q in qs] for _, qs in batch]
        pixels = {k: v.to(self.device) for k, v in self.image_processor(images=images, return_tensors="pt").items()}
        with torch.inference_mode(), autocast(self.device, self.precision):
            if self.family == "owlv2":
                found = self._owl(pixels, queries)
            else:
                found = self._grounding_dino(pixels, queries)
        results = []
        for (loaded, qs), (cxcywh, scores, label_idx), frame in zip(batch, found, self._frames(batch)):
            xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1)
            boxes = loaded.to_original(xyxy * np.tile(frame, 2))
            results.append(select_top_k(boxes, scores, [qs[i] for i in label_idx], self.k, self.nms_iou))
        return results

    def _frames(self, batch) -> list[np.ndarray]:
        """(w, h) the normalised boxes refer to: OWLv2 pads to a square, Grounding DINO does not."""
        sizes = [np.array(loaded.image.size, dtype=np.float64) for loaded, _ in batch]
        return [np.full(2, s.max()) for s in sizes] if self.family == "owlv2" else sizes

    def _owl(self, pixels: dict, queries: list[list[str]]):
        n = max(len(q) for q in queries)
        ids = torch.zeros(len(queries), n, self.max_text_len, dtype=torch.long)  # all-zero rows: masked queries
        for b, qs in enumerate(queries):
            ids[b, : len(qs)] = self._encode_queries(qs)
        ids = ids.flatten(0, 1).to(self.device)
        out = self.model(input_ids=ids, attention_mask=(ids > 0).long(), pixel_values=pixels["pixel_values"])
        probs = torch.sigmoid(out.logits.float())  # [batch, patches, queries]
        best = probs.max(dim=-1)
        return [(boxes.float().cpu().numpy(), s.cpu().numpy(), i.tolist())
                for boxes, s, i in zip(out.pred_boxes, best.values, best.indices)]

    def _encode_queries(self, qs: list[str]):
        if isinstance(self.tokenizer, HashTokenizer):
            bos, eos = self.tokenizer.vocab_size - 2, self.tokenizer.vocab_size - 1  # OWL pools at the largest id
            rows = [([bos] + self.tokenizer.word_ids(q))[: self.max_text_len - 1] + [eos] for q in qs]
            out = torch.zeros(len(qs), self.max_text_len, dtype=torch.long)
            for r, row in enumerate(rows):
                out[r, : len(row)] = torch.tensor(row)
            return out
        enc = self.tokenizer(qs, padding="max_length", max_length=self.max_text_len, truncation=True,
                             return_tensors="pt")
        return enc["input_ids"] * enc["attention_mask"]  # padding must be id 0 for OWL's query mask

    def _grounding_dino(self, pixels: dict, queries: list[list[str]]):
        encoded = [self._encode_phrases(qs) for qs in queries]
        length = max(len(ids) for ids, _ in encoded)
        ids = torch.zeros(len(queries), length, dtype=torch.long)
        for b, (row, _) in enumerate(encoded):
            ids[b, : len(row)] = torch.tensor(row)
        ids = ids.to(self.device)
        out = self.model(input_ids=ids, attention_mask=(ids > 0).long(), token_type_ids=torch.zeros_like(ids),
                         **pixels)
        probs = torch.sigmoid(out.logits.float())  # [batch, queries, text positions]
        found = []
        for boxes, prob, (_, spans) in zip(out.pred_boxes, probs, encoded):
            per_phrase = torch.stack([prob[:, a:b].max(dim=-1).values for a, b in spans], dim=-1)
            best = per_phrase.max(dim=-1)
            found.append((boxes.float().cpu().numpy(), best.values.cpu().numpy(), best.indices.tolist()))
        return found

    def _encode_phrases(self, qs: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
        """``[CLS] q1 . q2 . [SEP]`` ids and each phrase's token span, cut to the model's text length."""
        ids, spans = [_BERT_CLS], []
        for q in qs:
            if isinstance(self.tokenizer, HashTokenizer):
                words = self.tokenizer.word_ids(q)
            else:
                words = self.tokenizer(q, add_special_tokens=False)["input_ids"]
            if len(ids) + len(words) + 2 > self.model.config.max_text_len or not words:
                break
            spans.append((len(ids), len(ids) + len(words)))
            ids += words + [_BERT_DOT]
        if not spans:
            raise ValueError(f"no prompt phrase fits Grounding DINO's text length: {qs[:3]}")
        return ids + [_BERT_SEP], spans


def _tiny(family: str, t: dict):
    """Random weights from small configs: meaningless boxes, but every code path of a real model."""
    if family == "owlv2":
        from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

        vocab = t["vocab_size"]
        config = Owlv2Config(
            text_config=dict(vocab_size=vocab, hidden_size=t["hidden_size"], intermediate_size=2 * t["hidden_size"],
                             num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                             max_position_embeddings=t["max_text_len"], pad_token_id=0, bos_token_id=vocab - 2,
                             eos_token_id=vocab - 1),
            vision_config=dict(image_size=t["image_size"], patch_size=t["patch_size"], hidden_size=t["hidden_size"],
                               intermediate_size=2 * t["hidden_size"], num_hidden_layers=t["layers"],
                               num_attention_heads=t["heads"]),
            projection_dim=t["hidden_size"],
        )
        size = {"height": t["image_size"], "width": t["image_size"]}
        return Owlv2ForObjectDetection(config), Owlv2ImageProcessor(size=size), HashTokenizer(vocab)
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor

    h = t["hidden_size"]
    config = GroundingDinoConfig(
        backbone_config=dict(model_type="swin", image_size=t["image_size"], patch_size=4, embed_dim=16,
                             depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_indices=[2, 3, 4]),
        text_config=dict(model_type="bert", vocab_size=t["vocab_size"], hidden_size=h, num_hidden_layers=t["layers"],
                         num_attention_heads=t["heads"], intermediate_size=2 * h, max_position_embeddings=64),
        d_model=h, encoder_layers=t["layers"], decoder_layers=max(2, t["layers"]),  # fewer than 2 decoder layers fail
        encoder_ffn_dim=2 * h, decoder_ffn_dim=2 * h, encoder_attention_heads=t["heads"],
        decoder_attention_heads=t["heads"], num_queries=t["num_queries"], num_feature_levels=3,
        max_text_len=t["max_text_len"], encoder_n_points=2, decoder_n_points=2,
    )
    size = {"shortest_edge": t["image_size"], "longest_edge": t["image_size"] * 3 // 2}
    tokenizer = HashTokenizer(t["vocab_size"], reserved=(_BERT_CLS, _BERT_SEP, _BERT_DOT))
    return GroundingDinoForObjectDetection(config), GroundingDinoImageProcessor(size=size), tokenizer


def _pretrained(ref: ModelRef):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = load_from_folder(WHERE, ref, AutoProcessor.from_pretrained)
    check_tokenizer(WHERE, ref.folder, processor.tokenizer, minimum=100)
    model = load_from_folder(WHERE, ref, AutoModelForZeroShotObjectDetection.from_pretrained)
    return model, processor.image_processor, processor.tokenizer
