"""DVC stage `train_index`: fit the index-generation (H-Index-style BART pointer) model into models/index
(best dev GMNER epoch), logging to dvclive/index."""

import logging

from gmner.params import load_params
from gmner.train_index import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
