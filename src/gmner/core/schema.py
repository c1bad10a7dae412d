"""The Parquet data contract shared by every stage (documented in the README).

The vision stages' per-image tables are keyed by ``image_sha256`` (of the image file's bytes) and sorted by
it, their per-tweet tables sorted by ``tweet_id`` then ``split``. They never write a zero vector or an empty
caption for an image they could not read: the value is null and ``skip_reason`` says why.
"""

from __future__ import annotations

import pyarrow as pa

BOX = pa.list_(pa.float32(), 4)  # xyxy, pixels of the original image

ENTITY = pa.struct(
    [
        ("start", pa.int32()),  # first word
        ("end", pa.int32()),  # one past the last word
        ("type", pa.string()),
        ("text", pa.string()),  # words joined by single spaces
        ("boxes", pa.list_(BOX)),  # empty: ungroundable
    ]
)

TWEETS = pa.schema(
    [
        ("tweet_id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("image_id", pa.string()),
        ("image_path", pa.string()),  # as params spell it (relative stays relative); set even when missing
        ("image_sha256", pa.string()),  # null when the image is missing
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("tokens", pa.list_(pa.string())),
        ("tags", pa.list_(pa.string())),
        ("entities", pa.list_(ENTITY)),
    ]
)

PREDICTED_ENTITY = pa.struct(
    [
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("type", pa.string()),
        ("region", pa.int32()),  # index into the image's detector candidates; null: none predicted
        ("box", BOX),  # xyxy pixels; null: ungroundable
    ]
)

PREDICTIONS = pa.schema([("tweet_id", pa.string()), ("entities", pa.list_(PREDICTED_ENTITY))])

# --- vision stage outputs ----------------------------------------------------------------------------

# data/regions.parquet (detect): one row per distinct image of the prepared splits but those detect.policy skipped.
REGIONS = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("boxes", pa.list_(BOX)),  # top-K candidates, best first
        ("scores", pa.list_(pa.float32())),  # detector confidence, one per box
        ("labels", pa.list_(pa.string())),  # class or prompt phrase, one per box
    ]
)

# data/captions.parquet (caption): one row per distinct image of the prepared splits.
CAPTIONS = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("caption", pa.string()),  # null: the image could not be read
        ("skip_reason", pa.string()),  # a gmner.core.images.SKIP_REASONS kind; null when captioned
    ]
)

GENERATED_ENTITY = pa.struct(
    [
        ("start", pa.int32()),  # the entity's first word in the tweet
        ("end", pa.int32()),  # one past its last word
        ("type", pa.string()),  # its entity type
        ("text", pa.string()),  # its words joined by single spaces
        ("prompt", pa.string()),  # synthesize.entity_prompt filled in
        ("image_path", pa.string()),  # the generated PNG, relative to the repo root
        ("image_sha256", pa.string()),  # of that PNG
    ]
)

# data/synthesized.parquet (synthesize): one row per tweet.
SYNTHESIZED = pa.schema(
    [
        ("tweet_id", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.string()),  # synthesize.tweet_prompt filled in
        ("image_path", pa.string()),  # the generated PNG, relative to the repo root
        ("image_sha256", pa.string()),  # of that PNG
        ("seed", pa.int64()),  # the generator seed of that image
        ("relevance", pa.float32()),  # cosine(original, generated); null when the original is missing or unreadable
        ("relevant", pa.bool_()),  # relevance > theta; null with relevance
        ("skip_reason", pa.string()),  # why relevance is null: no_image or a gmner.core.images.SKIP_REASONS kind
        ("entities", pa.list_(GENERATED_ENTITY)),  # one per entity, in order; empty unless synthesize.entity_images
    ]
)


def vector(dim: int) -> pa.DataType:
    """An embedding: fixed_size_list<float32, dim>, float32 and not normalised."""
    return pa.list_(pa.float32(), dim)


def image_features_schema(dim: int, token_shape: tuple[int, int] | None = None) -> pa.Schema:
    """data/features/images.parquet (with ``token_shape``) and generated.parquet: one row per distinct image."""
    fields = [
        ("image_sha256", pa.string()),
        ("embedding", vector(dim)),  # the pooled image embedding; null when the image could not be read
    ]
    if token_shape is not None:
        patches, width = token_shape
        fields.append(("patch_tokens", pa.list_(vector(width), patches)))  # the last layer's; null with embedding
    fields.append(("skip_reason", pa.string()))  # a gmner.core.images.SKIP_REASONS kind; null when embedded
    return pa.schema(fields)


def region_features_schema(dim: int) -> pa.Schema:
    """data/features/regions.parquet: one row per row of data/regions.parquet."""
    return pa.schema(
        [
            ("image_sha256", pa.string()),
            ("embeddings", pa.list_(vector(dim))),  # one per box, in the detector's order; null: image unreadable
            ("skip_reason", pa.string()),  # a gmner.core.images.SKIP_REASONS kind; null when embedded
        ]
    )


def masked_features_schema(dim: int) -> pa.Schema:
    """data/features/masked.parquet (DLRAM's reflection): one row per distinct image of the features.masked.splits
    tweets that has a gold box."""
    return pa.schema(
        [
            ("image_sha256", pa.string()),
            ("boxes", pa.list_(BOX)),  # the distinct gold boxes of the image's tweets, sorted (by x1, y1, x2, y2)
            # one per box, in that order: the whole image with that box filled; null: image unreadable
            ("embeddings", pa.list_(vector(dim))),
            ("skip_reason", pa.string()),  # a gmner.core.images.SKIP_REASONS kind; null when embedded
        ]
    )


def text_features_schema(dim: int) -> pa.Schema:
    """data/features/text.parquet: one row per tweet (none without features.text)."""
    return pa.schema(
        [
            ("tweet_id", pa.string()),
            ("split", pa.string()),
            ("embedding", vector(dim)),  # of the tweet's words joined by spaces
        ]
    )
