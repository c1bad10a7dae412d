"""DVC stage `features`: embeddings of the prepared images, their regions, the generated images, the tweets, and
the images with each gold object masked (DLRAM's reflection).

Reads data/prepared/<split>.parquet, data/regions.parquet and data/synthesized.parquet; writes
data/features/{images,regions,generated,text,masked}.parquet and data/features_summary.json."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("features")
