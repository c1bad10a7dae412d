"""The NER models: text encoder and CRF tagger, the visual-input store and projection, the grounded tagger, index
generation, VSGN, BGA-MNER, the connector and the losses."""
