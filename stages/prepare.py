"""DVC stage `prepare`: read base.data_root into data/prepared/<split>.parquet and summary.json."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("prepare")
