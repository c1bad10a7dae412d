"""DVC stage `train_bga`: fit the CRF tagger with BGA-MNER's training-only generation objectives into
models/bga (best dev MNER epoch), logging to dvclive/bga."""

import logging

from gmner.params import load_params
from gmner.train_bga import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
