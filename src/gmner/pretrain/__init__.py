"""Vision-to-text pre-training (DLRAM, VTC): the alignment model, its objectives and its checkpoint."""
