"""DVC stage `sample`: generate the embedded synthetic Twitter-GMNER dataset into data/sample/."""

from __future__ import annotations

from gmner.params import load_params
from gmner.sample import run_stage

if __name__ == "__main__":
    run_stage(load_params())
