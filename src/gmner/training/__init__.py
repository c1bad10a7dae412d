"""The one training loop and the train stages built on it (tagger, grounded, index, VSGN, BGA, pretrain)."""
