"""DVC stage `train_vsgn`: fit the VSGN MNER tagger into models/vsgn (best dev MNER epoch), logging to
dvclive/vsgn."""

import logging

from gmner.params import load_params
from gmner.train_vsgn import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
