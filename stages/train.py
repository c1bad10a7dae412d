"""DVC stage `train`: fit the CRF text tagger into models/tagger (best dev epoch), logging to dvclive/tagger."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("train")
