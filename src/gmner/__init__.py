"""Grounded multimodal named entity recognition (GMNER) and multimodal NER (MNER) pipeline."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``gmner.load`` imports the API (and torch) on first use only, so ``import gmner`` stays cheap.
    if name == "load":
        from gmner.api import load

        return load
    raise AttributeError(f"module 'gmner' has no attribute {name!r}")
