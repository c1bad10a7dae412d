"""DVC stage `train_vsgn`: fit the VSGN MNER tagger into models/vsgn (best dev MNER epoch), logging to
dvclive/vsgn."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("train_vsgn")
