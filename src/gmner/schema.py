"""The Parquet data contract shared by every stage (documented in the README)."""

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

REGIONS = pa.schema(
    [
        ("image_sha256", pa.string()),
        ("boxes", pa.list_(BOX)),  # top-K candidates, best first
        ("scores", pa.list_(pa.float32())),
        ("labels", pa.list_(pa.string())),
    ]
)
