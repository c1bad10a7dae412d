"""DVC stage `detect`: data/prepared/<split>.parquet -> data/regions.parquet and data/regions_summary.json."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("detect")
