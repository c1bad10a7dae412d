"""DVC stage `train_bga`: fit the CRF tagger with BGA-MNER's training-only generation objectives into
models/bga (best dev MNER epoch), logging to dvclive/bga."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("train_bga")
