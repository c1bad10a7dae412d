"""DVC stage `train_grounded`: fit the CRF tagger with a grounding head into models/grounded (best dev GMNER
epoch), logging to dvclive/grounded."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("train_grounded")
