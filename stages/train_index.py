"""DVC stage `train_index`: fit the index-generation (H-Index-style BART pointer) model into models/index
(best dev GMNER epoch), logging to dvclive/index."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("train_index")
