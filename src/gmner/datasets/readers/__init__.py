"""Readers of the raw dataset formats; ``gmner.datasets.prepare`` turns their records into the TWEETS table."""

from gmner.datasets.readers.conll import Tweet, read_conll
from gmner.datasets.readers.voc import Voc, VocObject, box_problem, clip_box, read_voc

__all__ = ["Tweet", "Voc", "VocObject", "box_problem", "clip_box", "read_conll", "read_voc"]
