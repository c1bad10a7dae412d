"""DVC stage `evaluate`: predict each split with models/<model> and score it into metrics/<model>.json."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("evaluate")
