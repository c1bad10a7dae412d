"""Shared foundations: table schemas, errors and policies, atomic writes, params, BIO spans, boxes, image decoding,
model references."""
