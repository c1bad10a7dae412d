"""DVC stage `prepare`: read base.data_root into data/prepared/<split>.parquet and summary.json."""

from gmner.params import load_params
from gmner.prepare import run_stage

if __name__ == "__main__":
    run_stage(load_params())
