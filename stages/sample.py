"""DVC stage `sample`: generate the embedded synthetic Twitter-GMNER dataset into data/sample/."""

from gmner.pipeline import main

if __name__ == "__main__":
    main("sample")
