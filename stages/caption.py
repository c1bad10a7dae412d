"""DVC stage `caption`: data/prepared/<split>.parquet -> data/captions.parquet and data/caption_summary.json."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("caption")
