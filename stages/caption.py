"""DVC stage `caption`: data/prepared/<split>.parquet -> data/captions.parquet and data/caption_summary.json."""

from gmner.caption import run_stage
from gmner.params import load_params

if __name__ == "__main__":
    run_stage(load_params())
