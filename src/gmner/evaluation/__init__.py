"""Evaluation: the pure GMNER / MNER / EEG scorer, the evaluate stage, Markdown reports and ablation tables."""
