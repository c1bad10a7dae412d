"""DVC stage `train`: fit the CRF text tagger into models/tagger (best dev epoch), logging to dvclive/tagger."""

import logging

from gmner.params import load_params
from gmner.train_tagger import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
