"""DVC stage `train_grounded`: fit the CRF tagger with a grounding head into models/grounded (best dev GMNER
epoch), logging to dvclive/grounded."""

import logging

from gmner.params import load_params
from gmner.train_grounded import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
