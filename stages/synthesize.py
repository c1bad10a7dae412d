"""DVC stage `synthesize`: data/prepared/<split>.parquet -> data/synthesized.parquet and data/synthesize_summary.json.

The generated PNGs themselves live under the cache root (base.cache_root), named by their sha256."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("synthesize")
