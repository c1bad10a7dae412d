"""Datasets: readers of the Twitter-GMNER / Twitter-2015/2017 layouts, the prepare stage, and the embedded synthetic
sample."""
