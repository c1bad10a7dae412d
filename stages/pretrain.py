"""DVC stage `pretrain`: vision-to-text alignment pre-training (DLRAM + VTC objectives) into models/pretrain,
logging each loss component to dvclive/pretrain."""

import logging

from gmner.params import load_params
from gmner.pretrain import run_stage

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_stage(load_params())
