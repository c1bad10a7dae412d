"""Grounded multimodal named entity recognition (GMNER) and multimodal NER (MNER) pipeline."""

__version__ = "0.1.0"
