"""DVC stage `features`: embeddings of the prepared images, their regions, the generated images and the tweets.

Reads data/prepared/<split>.parquet, data/regions.parquet and data/synthesized.parquet; writes
data/features/{images,regions,generated,text}.parquet and data/features_summary.json.
"""

from gmner.features import run_stage
from gmner.params import load_params

if __name__ == "__main__":
    run_stage(load_params())
