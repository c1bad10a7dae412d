"""DVC stage `detect`: data/prepared/<split>.parquet -> data/regions.parquet and data/regions_summary.json."""

from gmner.detect import run_stage
from gmner.params import load_params

if __name__ == "__main__":
    run_stage(load_params())
