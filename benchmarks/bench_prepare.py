"""Time `prepare` (CoNLL + VOC xml -> TWEETS tables) on the real Twitter10000 v2 train and dev splits.

Run: python benchmarks/bench_prepare.py [--repeat N]. Needs ../shared/data/twitter10000_v2 beside the repo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gmner.core.params import load_params
from gmner.datasets.prepare import prepare_configured_split

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "twitter10000_v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: real data not found at {DATA}")
        return
    cfg = load_params(REPO / "params.yaml")["prepare"]
    best, tweets = float("inf"), 0
    for _ in range(args.repeat):
        start, tweets = time.perf_counter(), 0
        for split in ("train", "dev"):
            table, _ = prepare_configured_split(cfg, DATA, split)
            tweets += table.num_rows
        best = min(best, time.perf_counter() - start)
    print(f"prepare train+dev: {tweets} tweets in {best:.3f} s ({tweets / best:,.0f} tweets/s, best of {args.repeat})")


if __name__ == "__main__":
    main()
