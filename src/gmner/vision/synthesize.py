"""The synthesize stage: a generated image per tweet (and per entity), and the relevance of each original image.

Every tweet of the prepared splits gets a prompt (``synthesize.tweet_prompt``) and, with ``entity_images``,
each of its entities one more (``entity_prompt``). Each distinct prompt is one cached item of a
text-to-image diffusers pipeline: the cache is keyed by digest(prompt) under a fingerprint of the model, the
generation params and ``base.seed``, and the item's seed is derived from ``base.seed`` and that key. Every
pipeline call has ``batch_size`` prompts (:func:`gmner.vision.models.fixed_batches`), so a re-run, an
incremental run and a sharded run all give the same PNG bytes. The PNG bytes live in the cache,
integrity-checked; each is also kept as a plain file ``<cache_root>/synthesize/png/<sha[:2]>/<sha256>.png``
(named by its content), which the output points at and which is rewritten from the cache if deleted.

Relevance (DLRAM): cosine between CLIP image embeddings (``synthesize.relevance``) of the original image and
of the tweet's generated image; the original is relevant when the cosine is above ``theta``. Changing theta
costs no model call: embeddings are cached, the cosine is recomputed.

Writes data/synthesized.parquet (:data:`gmner.core.schema.SYNTHESIZED`, one row per tweet, sorted by tweet_id then
split) and data/synthesize_summary.json.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from gmner.core import schema
from gmner.core.atomic import write_bytes, write_parquet
from gmner.core.hashing import digest
from gmner.core.params import check_keys
from gmner.vision.cache import ItemCache
from gmner.vision.inputs import ImageLoad, distinct_images, image_policy, prepared_tables, tweet_text
from gmner.vision.models import TextToImage, embed_images, load_image_encoder
from gmner.vision.runner import ARRAYS, Codec, Item, StageRun, combined_summary, run_items, stage_device, write_summary

PARAMS = (  # the keys of the `synthesize` params group
    "model", "tiny", "precision", "batch_size", "steps", "guidance_scale", "size", "negative_prompt",
    "tweet_prompt", "entity_prompt", "entity_images", "theta", "relevance", "num_workers", "max_pixels",
    "max_side", "policy",
)


def item_seed(base_seed: int, key: str) -> int:
    """A 63-bit generator seed from the stage seed and the item key."""
    return int(digest(base_seed, key)[:16], 16) >> 1


@dataclass(frozen=True)
class PngStore:
    """Cache codec for generated PNGs: decoding keeps the bytes as a plain, content-named file under ``root``.

    Decoded results are small dicts (path and sha256), so a stage over many images never holds them in memory.
    """

    root: Path  # the repo root
    folder: str  # relative to root

    def encode(self, png: bytes) -> bytes:
        return png

    def decode(self, blob: bytes) -> dict:
        sha = hashlib.sha256(blob).hexdigest()
        rel = f"{self.folder}/{sha[:2]}/{sha}.png"
        if not (self.root / rel).is_file():
            write_bytes(self.root / rel, blob)
        return {"image_path": rel, "image_sha256": sha}

    @property
    def codec(self) -> Codec:
        return Codec(self.encode, self.decode)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # no metadata: the bytes depend on the pixels only
    return buf.getvalue()


def prompts_of(tweet: dict, cfg: dict) -> tuple[str, list[str]]:
    """(tweet prompt, one prompt per entity, empty unless ``entity_images``) from the param templates."""
    text = tweet_text(tweet["tokens"])
    try:
        prompt = cfg["tweet_prompt"].format(text=text)
        entities = [cfg["entity_prompt"].format(entity=e["text"], type=e["type"], text=text)
                    for e in tweet["entities"]]
    except (KeyError, IndexError) as err:
        raise ValueError(f"synthesize prompts: unknown placeholder {err} (known: text, entity, type)") from None
    return prompt, entities if cfg["entity_images"] else []


def run_stage(params: dict, root: str | Path = ".") -> dict | None:
    """Generate and score every prepared tweet; returns the summary on the main process (None on other ranks)."""
    base, cfg, root = params["base"], params["synthesize"], Path(root)
    check_keys("synthesize", cfg, PARAMS)
    device = stage_device(base["device"])
    cache_root = root / base["cache_root"]
    tables = prepared_tables(params, root)
    tweets = sorted((row for table in tables for row in table.to_pylist()), key=lambda r: (r["tweet_id"], r["split"]))
    prompts = [prompts_of(tweet, cfg) for tweet in tweets]
    keys = {p: digest(p) for tweet_prompt, entity_prompts in prompts for p in (tweet_prompt, *entity_prompts)}

    t2i = TextToImage(cfg, base["seed"], device, hash_memo=cache_root / "file_hashes")
    options = {"num_inference_steps": cfg["steps"], "guidance_scale": cfg["guidance_scale"],
               "height": cfg["size"], "width": cfg["size"]}
    negative, per_call = cfg["negative_prompt"] or None, cfg["batch_size"]

    def generate(batch: list[tuple[str, int]]) -> list[bytes]:
        texts, seeds = zip(*batch)
        return [png_bytes(image) for image in t2i(list(texts), list(seeds), per_call, negative, **options)]

    store = PngStore(root, f"{Path(base['cache_root']).as_posix()}/synthesize/png")
    gen = run_items(
        [Item(key, (prompt, item_seed(base["seed"], key))) for prompt, key in keys.items()],
        cache=ItemCache(cache_root, "synthesize", digest(t2i.fingerprint, options, negative, base["seed"])),
        compute=generate, codec=store.codec, policy={}, batch_size=cfg["batch_size"], desc="synthesize",
    )
    generated = dict(gen.results)  # small dicts, read by every rank for the relevance pass

    encoder = load_image_encoder(cfg["relevance"], base["seed"], device, where="synthesize.relevance.model",
                                 hash_memo=cache_root / "file_hashes")
    paths = distinct_images(tables, root)
    for tweet_prompt, _ in prompts:  # the generated tweet images; entity images need no relevance
        image = generated[keys[tweet_prompt]]
        paths[image["image_sha256"]] = str(root / image["image_path"])
    rel = run_items(
        [Item(sha, path) for sha, path in paths.items()],
        cache=ItemCache(cache_root, "synthesize-clip", encoder.fingerprint),
        compute=lambda pixels: embed_images(encoder, pixels, per_call),
        load=ImageLoad(cfg["max_pixels"], cfg["max_side"], encoder.preprocess),
        codec=ARRAYS,
        policy=image_policy(cfg["policy"], "synthesize.policy"),
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"],
        desc="synthesize relevance",
    )
    if not rel.is_main:
        return None
    rows = [_row(t, p, generated, keys, rel, cfg, base["seed"]) for t, p in zip(tweets, prompts)]
    write_parquet(root / "data" / "synthesized.parquet", pa.Table.from_pylist(rows, schema=schema.SYNTHESIZED))
    relevant = [row["relevant"] for row in rows]
    summary = {
        "model": cfg["model"], "tweets": len(rows), "prompts": len(keys), "theta": cfg["theta"],
        "relevant": relevant.count(True), "irrelevant": relevant.count(False), "unscored": relevant.count(None),
        **combined_summary({"generate": gen, "relevance": rel}),
    }
    write_summary(root / "data" / "synthesize_summary.json", summary, "synthesize")
    return summary


def _row(tweet: dict, prompts, generated: dict, keys: dict, rel: StageRun, cfg: dict, base_seed: int) -> dict:
    tweet_prompt, entity_prompts = prompts
    image = generated[keys[tweet_prompt]]
    relevance, reason = _relevance(tweet["image_sha256"], image["image_sha256"], rel)
    entities = [
        {**{k: entity[k] for k in ("start", "end", "type", "text")}, "prompt": prompt, **generated[keys[prompt]]}
        for entity, prompt in zip(tweet["entities"], entity_prompts)
    ]
    return {
        "tweet_id": tweet["tweet_id"], "split": tweet["split"], "prompt": tweet_prompt, **image,
        "seed": item_seed(base_seed, keys[tweet_prompt]), "relevance": relevance,
        "relevant": None if relevance is None else relevance > cfg["theta"], "skip_reason": reason,
        "entities": entities,
    }


def _relevance(original: str | None, generated: str, rel: StageRun) -> tuple[float | None, str | None]:
    """(cosine, None), or (None, why not): no_image, or the policy reason of the original or generated image."""
    if original is None:
        return None, "no_image"
    ours, reason = rel.outcome(original)
    if reason is None:
        theirs, reason = rel.outcome(generated)
    if reason is not None:
        return None, reason
    return _cosine(ours["embedding"], theirs["embedding"]), None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    # Rounded to float32 here so the comparison with theta sees exactly the stored value.
    return float(np.float32(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
