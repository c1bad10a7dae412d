"""DVC stage `evaluate`: predict each split with models/<model> and score it into metrics/<model>.json."""

from __future__ import annotations

import argparse

from gmner.evaluation import run_stage
from gmner.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tagger", help="model folder under models/ (default: tagger)")
    args = parser.parse_args(argv)
    run_stage(load_params(), args.model)


if __name__ == "__main__":
    main()
